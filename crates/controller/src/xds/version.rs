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
    /// (empty on a first request, another control plane's). Only the text
    /// `Display` writes: `1-07`, `+1-7` or `01-7` were never sent, so an
    /// ACK carrying one acknowledges nothing (found by the fuzzer, which
    /// read `1-07` as revision 7).
    pub fn parse(text: &str) -> Option<Version> {
        let (epoch, revision) = text.split_once('-')?;
        let version = Version {
            epoch: Epoch::from_bits(epoch.parse().ok()?),
            revision: revision.parse().ok()?,
        };
        // Also refuses an epoch that from_bits had to change (0, or above 2^53).
        (version.to_string() == text).then_some(version)
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

    #[test]
    fn only_the_text_signpost_writes_reads_as_a_version() {
        // Found by the fuzzer: "1-07" read as revision 7 of epoch 1.
        for padded in ["1-07", "01-7", "+1-7", "1-+7", "9007199254740992-1"] {
            assert_eq!(Version::parse(padded), None, "{padded:?}");
        }
        assert_eq!(
            Version::parse("1-7"),
            Some(Version {
                epoch: Epoch::from_bits(1),
                revision: 7
            })
        );
    }
}
