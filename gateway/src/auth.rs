//! Bearer-token authentication of the gateway's callers, off unless tokens
//! are configured.
//!
//! Propeller sends no credentials to agents (PROTOCOL.md §2.3), so a gateway
//! that propeller calls runs with authentication off and is kept private by
//! the network (a ClusterIP Service, a NetworkPolicy). Turn it on when the
//! gateway is reachable by callers that can send a token, the `flotilla` CLI
//! among them (`--token`). Then every call but health checks must carry
//! `authorization: Bearer <token>` with one of the configured tokens; any
//! other call is answered UNAUTHENTICATED, and the message names nothing
//! secret. The header is removed before a call goes on to a plugin service.

use std::{fmt, path::Path};

use http::HeaderValue;

/// The tokens callers may present.
#[derive(Clone)]
pub struct Auth {
    /// Each accepted token.
    accepted: Vec<Vec<u8>>,
}

/// A token held in configuration: its `Debug` does not show it.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Auth {{ {} token(s) }}", self.accepted.len())
    }
}

/// Where the tokens came from, for errors and `--check-config` (never the tokens).
pub(crate) const FROM_ENV: &str = "FLOTILLA_AUTH_TOKEN";

impl Auth {
    /// Tokens from `file` (one per line; blank lines and `#` comments are
    /// skipped, so a new token can be added before the old one is removed)
    /// and from `env_token`, when given.
    ///
    /// # Errors
    /// Names the file (and line) that cannot be read or holds a token that
    /// cannot travel in a header, or says that no token was found. Never
    /// quotes a token.
    pub fn load(file: Option<&Path>, env_token: Option<&str>) -> Result<Option<Self>, String> {
        let mut accepted = Vec::new();
        if let Some(file) = file {
            let text = std::fs::read_to_string(file).map_err(|e| {
                format!("auth_token_file (FLOTILLA_AUTH_TOKEN_FILE): cannot read {}: {e}", file.display())
            })?;
            let mut found = false;
            for (n, line) in text.lines().enumerate() {
                let token = line.trim();
                if token.is_empty() || token.starts_with('#') {
                    continue;
                }
                accepted.push(bearer(token).map_err(|e| {
                    format!(
                        "auth_token_file (FLOTILLA_AUTH_TOKEN_FILE): {} line {}: {e}",
                        file.display(),
                        n + 1
                    )
                })?);
                found = true;
            }
            if !found {
                return Err(format!(
                    "auth_token_file (FLOTILLA_AUTH_TOKEN_FILE): {} holds no token",
                    file.display()
                ));
            }
        }
        if let Some(token) = env_token {
            accepted.push(bearer(token.trim()).map_err(|e| format!("{FROM_ENV}: {e}"))?);
        }
        Ok((!accepted.is_empty()).then_some(Self { accepted }))
    }

    /// How many tokens are accepted.
    pub fn tokens(&self) -> usize {
        self.accepted.len()
    }

    /// Whether `value` (the call's `authorization` header) presents an
    /// accepted token: `Bearer <token>`, the scheme in any case (RFC 6750).
    /// Every token is compared in full, in time that does not depend on where
    /// the bytes differ.
    pub fn allows(&self, value: Option<&HeaderValue>) -> bool {
        let Some(value) = value else { return false };
        let Some((scheme, token)) = value.as_bytes().split_at_checked(6) else { return false };
        let Some(token) = token.strip_prefix(b" ") else { return false };
        let token = token.trim_ascii_start();
        scheme.eq_ignore_ascii_case(b"bearer")
            && self.accepted.iter().fold(false, |ok, want| ok | same(want, token))
    }
}

/// `token`'s bytes, once it is known to be usable.
fn bearer(token: &str) -> Result<Vec<u8>, String> {
    if token.is_empty() {
        return Err("the token is empty".to_owned());
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(
            "the token holds a character other than visible ASCII (it must travel in a header)".to_owned()
        );
    }
    Ok(token.as_bytes().to_vec())
}

/// `a == b`, comparing every byte whatever the first difference.
fn same(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The answer to a call without an accepted token.
pub fn refusal() -> tonic::Status {
    tonic::Status::unauthenticated(
        "missing or wrong credentials: this gateway requires the header `authorization: Bearer <token>` \
         with one of its configured tokens",
    )
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;

    fn header(s: &str) -> HeaderValue {
        HeaderValue::from_str(s).unwrap()
    }

    #[test]
    fn tokens_come_from_a_file_and_the_environment() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        writeln!(file, "# rotated 2026-11\n\n  old-token-1  \nnew-token-2").unwrap();
        let auth = Auth::load(Some(file.path()), Some("env-token-3")).unwrap().unwrap();
        assert_eq!(auth.tokens(), 3);
        for t in ["old-token-1", "new-token-2", "env-token-3"] {
            assert!(auth.allows(Some(&header(&format!("Bearer {t}")))), "{t}");
        }
        for ok in ["bearer old-token-1", "BEARER  new-token-2"] {
            assert!(auth.allows(Some(&header(ok))), "{ok:?}");
        }
        for wrong in [
            "Bearer old-token-",
            "Bearer old-token-11",
            "old-token-1",
            "Basic old-token-1",
            "Bearer ",
            "Bearerold-token-1",
            "Bearer old-token-1 ",
        ] {
            assert!(!auth.allows(Some(&header(wrong))), "{wrong:?}");
        }
        assert!(!auth.allows(None));
        assert!(!format!("{auth:?}").contains("token-"), "{auth:?}");
    }

    #[test]
    fn nothing_configured_is_off_and_bad_sources_are_named_without_their_tokens() {
        assert!(Auth::load(None, None).unwrap().is_none());
        let mut empty = tempfile::NamedTempFile::new().unwrap();
        writeln!(empty, "# none yet").unwrap();
        let e = Auth::load(Some(empty.path()), None).unwrap_err();
        assert!(e.contains("holds no token"), "{e}");
        let e = Auth::load(Some(Path::new("/nonexistent/flotilla-token")), None).unwrap_err();
        assert!(e.contains("cannot read /nonexistent/flotilla-token"), "{e}");
        let mut bad = tempfile::NamedTempFile::new().unwrap();
        writeln!(bad, "fine\nsecret\u{e9}value").unwrap();
        let e = Auth::load(Some(bad.path()), None).unwrap_err();
        assert!(e.contains("line 2") && !e.contains("secret"), "{e}");
        let e = Auth::load(None, Some("has space")).unwrap_err();
        assert!(e.starts_with(FROM_ENV) && !e.contains("has space"), "{e}");
    }
}
