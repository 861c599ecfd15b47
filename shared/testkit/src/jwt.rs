//! The verifying side of RS256 JWTs, for fakes of APIs that take them, and the test key pair
//! (`keys/`, test-only).

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};

/// The test private key, PKCS#8 PEM.
pub const TEST_KEY_PKCS8_PEM: &str = include_str!("../keys/test_rsa_pkcs8.pem");
/// The same key, PKCS#1 PEM.
pub const TEST_KEY_PKCS1_PEM: &str = include_str!("../keys/test_rsa_pkcs1.pem");
/// Its public key, SubjectPublicKeyInfo DER.
pub const TEST_PUBLIC_KEY_DER: &[u8] = include_bytes!("../keys/test_rsa_pub.der");

/// Checks an RS256 JWT's signature against a DER `SubjectPublicKeyInfo` and returns its claims.
/// For fakes and tests that play the verifying side.
///
/// # Errors
/// A description of what did not verify.
pub fn verify_rs256(token: &str, spki_der: &[u8]) -> Result<serde_json::Value, String> {
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("not a compact JWT (three dot-separated parts)".into());
    };
    let header: serde_json::Value = decode_part(header)?;
    if header["alg"] != "RS256" {
        return Err(format!("alg is {}, expected RS256", header["alg"]));
    }
    let signature = URL_SAFE_NO_PAD.decode(signature).map_err(|e| format!("signature: {e}"))?;
    let pkcs1 = pkcs1_from_spki(spki_der).ok_or("the public key is not a SubjectPublicKeyInfo")?;
    ring::signature::UnparsedPublicKey::new(&ring::signature::RSA_PKCS1_2048_8192_SHA256, pkcs1)
        .verify(format!("{}.{payload}", token.split('.').next().unwrap_or_default()).as_bytes(), &signature)
        .map_err(|_| "the signature does not verify".to_owned())?;
    decode_part(payload)
}

fn decode_part(part: &str) -> Result<serde_json::Value, String> {
    let bytes = URL_SAFE_NO_PAD.decode(part).map_err(|e| format!("base64url: {e}"))?;
    serde_json::from_slice(&bytes).map_err(|e| format!("JSON: {e}"))
}

/// The BIT STRING contents of a SubjectPublicKeyInfo this module wrote (or `openssl` did).
fn pkcs1_from_spki(spki: &[u8]) -> Option<&[u8]> {
    let (_, inner) = read_tlv(spki, 0x30)?;
    let (rest, _) = read_tlv(inner, 0x30)?;
    let (_, bits) = read_tlv(rest, 0x03)?;
    bits.split_first().map(|(_, key)| key)
}

/// Reads one DER element of `tag`: (the bytes after it, its value).
fn read_tlv(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&t, rest) = input.split_first()?;
    if t != tag {
        return None;
    }
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        let (bytes, after) = rest.split_at_checked(n)?;
        rest = after;
        bytes.iter().fold(0usize, |acc, b| (acc << 8) | usize::from(*b))
    };
    let (value, after) = rest.split_at_checked(len)?;
    Some((after, value))
}
