//! The tokens file: bearer tokens by their SHA-256, each naming an identity
//! and a role. Only hashes are at rest, so a leaked file (or a backup of
//! the Secret) gives no working token.
//!
//! ```toml
//! [[token]]
//! sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
//! identity = "edge-1"
//! role = "router"
//! ```

use std::collections::HashMap;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::Role;
use crate::config::ConfigError;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    token: Vec<Entry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    sha256: String,
    identity: String,
    role: Role,
}

/// Who holds a token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    pub identity: String,
    pub role: Role,
}

/// The tokens in force: SHA-256 (lowercase hex) → holder.
#[derive(Debug, Default)]
pub struct Tokens(HashMap<String, Holder>);

fn invalid(reason: String) -> ConfigError {
    ConfigError::Invalid {
        key: "auth.tokens_file".into(),
        reason,
    }
}

impl Tokens {
    pub fn parse(text: &[u8]) -> Result<Tokens, ConfigError> {
        let text = std::str::from_utf8(text).map_err(|e| invalid(format!("not UTF-8: {e}")))?;
        let file: File = toml::from_str(text)
            .map_err(|e| invalid(e.to_string().trim_end().replace('\n', " ")))?;
        let mut tokens = HashMap::new();
        for (i, entry) in file.token.into_iter().enumerate() {
            let at = format!("token #{} ({:?})", i + 1, entry.identity);
            let hash = entry.sha256.to_ascii_lowercase();
            if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(invalid(format!(
                    "{at}: sha256 must be 64 hex digits (`printf %s TOKEN | sha256sum`)"
                )));
            }
            if !crate::routers::valid_id(&entry.identity) {
                return Err(invalid(format!(
                    "{at}: identity must be 1 to 253 letters, digits, '.', '_' or '-'"
                )));
            }
            let holder = Holder {
                identity: entry.identity,
                role: entry.role,
            };
            if tokens.insert(hash, holder).is_some() {
                return Err(invalid(format!(
                    "{at}: the same token hash is listed twice"
                )));
            }
        }
        Ok(Tokens(tokens))
    }

    /// The holder of `token`, if it is listed. Looking up its hash leaks
    /// through timing at most which hashes are near it, not the token.
    pub fn holder(&self, token: &str) -> Option<&Holder> {
        self.0.get(&sha256_hex(token.as_bytes()))
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listed_token_names_its_holder_and_no_other_does() {
        let text = format!(
            "[[token]]\nsha256 = \"{}\"\nidentity = \"edge-1\"\nrole = \"router\"\n",
            sha256_hex(b"s3cret").to_uppercase()
        );
        let tokens = Tokens::parse(text.as_bytes()).unwrap();
        assert_eq!(
            tokens.holder("s3cret"),
            Some(&Holder {
                identity: "edge-1".into(),
                role: Role::Router
            })
        );
        assert_eq!(tokens.holder("s3cret "), None);
        assert_eq!(
            tokens.holder(&sha256_hex(b"s3cret")),
            None,
            "the hash is no token"
        );
    }

    #[test]
    fn errors_name_the_key_and_the_entry() {
        let err = |text: &str| Tokens::parse(text.as_bytes()).unwrap_err().to_string();
        let e = err("[[token]]\nsha256 = \"abc\"\nidentity = \"a\"\nrole = \"router\"\n");
        assert!(
            e.contains("auth.tokens_file") && e.contains("token #1 (\"a\")"),
            "{e}"
        );
        let e = err("[[token]]\nsha256 = \"abc\"\nidentity = \"a\"\nrole = \"root\"\n");
        assert!(e.contains("auth.tokens_file") && e.contains("root"), "{e}");
        let hash = sha256_hex(b"x");
        let twice = format!(
            "[[token]]\nsha256 = \"{hash}\"\nidentity = \"a\"\nrole = \"router\"\n\
             [[token]]\nsha256 = \"{hash}\"\nidentity = \"b\"\nrole = \"admin\"\n"
        );
        assert!(err(&twice).contains("twice"));
    }
}
