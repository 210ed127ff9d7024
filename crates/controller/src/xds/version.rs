//! A response's `version_info`, `<epoch>-<revision>`: written into every
//! response and read back from every ACK. Apart from the server so that it
//! builds without tonic or the AWS SDK (`fuzz/` pulls this file in by path).

use std::fmt;

use signpost_protocol::{Epoch, Revision};

/// A response's `version_info`: the controller lifetime and the registry
/// revision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Version {
    pub epoch: Epoch,
    pub revision: Revision,
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.epoch, self.revision)
    }
}

impl Version {
    /// Reads a `version_info`; `None` for anything signpost did not write
    /// (empty on a first request, another control plane's).
    pub fn parse(text: &str) -> Option<Version> {
        let (epoch, revision) = text.split_once('-')?;
        let epoch: u64 = epoch.parse().ok()?;
        if Epoch::from_bits(epoch).get() != epoch {
            return None;
        }
        Some(Version {
            epoch: Epoch::from_bits(epoch),
            revision: revision.parse().ok()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_read_back_and_foreign_ones_do_not_parse() {
        let v = Version {
            epoch: Epoch::from_bits(77),
            revision: 12,
        };
        assert_eq!(Version::parse(&v.to_string()), Some(v));
        for foreign in ["", "12", "x-1", "1-x", "0-3", "1-2-3"] {
            assert_eq!(Version::parse(foreign), None, "{foreign:?}");
        }
    }
}
