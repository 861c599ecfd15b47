//! RS256 JSON Web Tokens signed with an RSA private key in PEM form: the assertion Google's
//! OAuth token endpoint takes for a service account, and the bearer token of Snowflake's
//! key-pair authentication (whose issuer carries the public key's fingerprint).

use std::fmt;

use base64::{
    Engine as _,
    engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD},
};
use ring::{
    rand::SystemRandom,
    signature::{RSA_PKCS1_SHA256, RsaKeyPair},
};

/// Why a private key could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// No PEM block of a supported kind.
    #[error(
        "no RSA private key in PEM form (expected \"-----BEGIN PRIVATE KEY-----\" or \"-----BEGIN RSA PRIVATE KEY-----\")"
    )]
    NotPem,
    /// A passphrase-protected key.
    #[error("the private key is encrypted; provide it unencrypted (PKCS#8 \"BEGIN PRIVATE KEY\")")]
    Encrypted,
    /// The PEM body is not base64.
    #[error("the private key's PEM body is not valid base64")]
    Base64,
    /// The key itself was rejected.
    #[error("the private key is not a usable RSA key: {0}")]
    Rejected(String),
}

/// An RSA private key that signs RS256 JWTs. Never printed.
pub struct RsaKey {
    pair: RsaKeyPair,
    rng: SystemRandom,
}

impl fmt::Debug for RsaKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RsaKey([redacted])")
    }
}

impl RsaKey {
    /// Reads a PKCS#8 (`BEGIN PRIVATE KEY`) or PKCS#1 (`BEGIN RSA PRIVATE KEY`) PEM key.
    ///
    /// # Errors
    /// [`KeyError`] saying what is wrong, never quoting the key.
    pub fn from_pem(pem: &str) -> Result<Self, KeyError> {
        if pem.contains("BEGIN ENCRYPTED PRIVATE KEY") || pem.contains("Proc-Type: 4,ENCRYPTED") {
            return Err(KeyError::Encrypted);
        }
        let (label, der) = pem_block(pem)?;
        let pair = match label {
            "PRIVATE KEY" => RsaKeyPair::from_pkcs8(&der),
            "RSA PRIVATE KEY" => RsaKeyPair::from_der(&der),
            _ => return Err(KeyError::NotPem),
        }
        .map_err(|e| KeyError::Rejected(e.to_string()))?;
        Ok(Self { pair, rng: SystemRandom::new() })
    }

    /// A compact JWT with header `{"alg":"RS256","typ":"JWT"}` and these claims.
    pub fn sign_rs256(&self, claims: &serde_json::Value) -> String {
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256","typ":"JWT"}"#);
        let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
        let signing_input = format!("{header}.{payload}");
        let mut signature = vec![0; self.pair.public().modulus_len()];
        self.pair
            .sign(&RSA_PKCS1_SHA256, &self.rng, signing_input.as_bytes(), &mut signature)
            .expect("the signature buffer is the modulus length, as ring requires");
        format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(signature))
    }

    /// The public key as a DER `SubjectPublicKeyInfo` (what `openssl rsa -pubout` writes).
    pub fn public_key_der(&self) -> Vec<u8> {
        spki(self.pair.public().as_ref())
    }

    /// `SHA256:` and the base64 SHA-256 of [`Self::public_key_der`]: the fingerprint
    /// Snowflake shows as `RSA_PUBLIC_KEY_FP` and expects in a key-pair JWT's issuer.
    pub fn public_key_fingerprint(&self) -> String {
        let digest = ring::digest::digest(&ring::digest::SHA256, &self.public_key_der());
        format!("SHA256:{}", STANDARD.encode(digest.as_ref()))
    }
}

/// The label and decoded body of the first PEM block.
fn pem_block(pem: &str) -> Result<(&str, Vec<u8>), KeyError> {
    let start = pem.find("-----BEGIN ").ok_or(KeyError::NotPem)?;
    let rest = &pem[start + "-----BEGIN ".len()..];
    let label_end = rest.find("-----").ok_or(KeyError::NotPem)?;
    let label = &rest[..label_end];
    let body = &rest[label_end + 5..];
    let end = body.find(&format!("-----END {label}-----")).ok_or(KeyError::NotPem)?;
    let b64: String = body[..end].chars().filter(|c| !c.is_whitespace()).collect();
    let der = STANDARD.decode(b64).map_err(|_| KeyError::Base64)?;
    Ok((label, der))
}

/// Wraps a PKCS#1 `RSAPublicKey` in a `SubjectPublicKeyInfo` with the rsaEncryption algorithm.
fn spki(pkcs1: &[u8]) -> Vec<u8> {
    // AlgorithmIdentifier { rsaEncryption (1.2.840.113549.1.1.1), NULL }
    const ALGORITHM: [u8; 15] =
        [0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00];
    let mut bit_string = vec![0u8]; // no unused bits
    bit_string.extend_from_slice(pkcs1);
    let mut inner = ALGORITHM.to_vec();
    inner.extend(der_tlv(0x03, &bit_string));
    der_tlv(0x30, &inner)
}

fn der_tlv(tag: u8, value: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = value.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes: Vec<u8> = len.to_be_bytes().into_iter().skip_while(|b| *b == 0).collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend(bytes);
    }
    out.extend_from_slice(value);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const PKCS8: &str = include_str!("../../testkit/keys/test_rsa_pkcs8.pem");
    const PKCS1: &str = include_str!("../../testkit/keys/test_rsa_pkcs1.pem");

    #[test]
    fn signs_tokens_that_verify_and_both_pem_forms_are_the_same_key() {
        let key = RsaKey::from_pem(PKCS8).unwrap();
        let claims = serde_json::json!({"iss": "me", "exp": 1});
        let token = key.sign_rs256(&claims);
        assert_eq!(flotilla_testkit::jwt::verify_rs256(&token, &key.public_key_der()).unwrap(), claims);
        let other = RsaKey::from_pem(PKCS1).unwrap();
        assert_eq!(other.public_key_fingerprint(), key.public_key_fingerprint());
        let mut forged = token.clone();
        forged.replace_range(token.len() - 4.., "AAAA");
        assert!(flotilla_testkit::jwt::verify_rs256(&forged, &key.public_key_der()).is_err());
    }

    #[test]
    fn fingerprint_matches_openssl() {
        // `openssl pkey -in test_rsa_pkcs8.pem -pubout -outform DER | openssl dgst -sha256 -binary | base64`
        let out = std::process::Command::new("openssl")
            .args(["pkey", "-pubout", "-outform", "DER", "-in"])
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../testkit/keys/test_rsa_pkcs8.pem"))
            .output();
        let Ok(out) = out else { return }; // openssl is not everywhere; the DER test below still runs
        let key = RsaKey::from_pem(PKCS8).unwrap();
        assert_eq!(key.public_key_der(), out.stdout);
    }

    #[test]
    fn bad_keys_get_clear_errors() {
        assert!(matches!(RsaKey::from_pem("nothing"), Err(KeyError::NotPem)));
        assert!(matches!(
            RsaKey::from_pem(
                "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----"
            ),
            Err(KeyError::Encrypted)
        ));
        assert!(matches!(
            RsaKey::from_pem("-----BEGIN PRIVATE KEY-----\n!!!\n-----END PRIVATE KEY-----"),
            Err(KeyError::Base64)
        ));
        assert!(matches!(
            RsaKey::from_pem("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----"),
            Err(KeyError::Rejected(_))
        ));
    }
}
