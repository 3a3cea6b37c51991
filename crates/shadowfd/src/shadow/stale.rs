//! Staleness: is a shadow still what its source holds?

use crate::source::{Source, SourceMeta};

/// A metadata field that differs from what was recorded at open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "lowercase"))]
#[non_exhaustive]
pub enum Field {
    Size,
    Mtime,
    Ctime,
    /// Device or inode number: another file now stands at the same place.
    Identity,
    Kind,
}

/// The answer of [`crate::Shadow::staleness`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(
    feature = "serde",
    serde(tag = "state", content = "fields", rename_all = "lowercase")
)]
#[non_exhaustive]
pub enum Staleness {
    /// The source's metadata is as it was when the shadow was made.
    Unchanged,
    /// These fields differ.
    Changed(Vec<Field>),
    /// The source was deleted or replaced; the shadow keeps the old bytes.
    Gone,
}

impl Staleness {
    pub fn is_unchanged(&self) -> bool {
        matches!(self, Staleness::Unchanged)
    }
}

/// Compares two metadata records field by field.
pub fn diff(then: &SourceMeta, now: &SourceMeta) -> Vec<Field> {
    let mut f = Vec::new();
    if then.size != now.size {
        f.push(Field::Size);
    }
    if then.mtime != now.mtime {
        f.push(Field::Mtime);
    }
    if then.ctime != now.ctime {
        f.push(Field::Ctime);
    }
    if (then.device, then.inode) != (now.device, now.inode) {
        f.push(Field::Identity);
    }
    if then.kind != now.kind {
        f.push(Field::Kind);
    }
    f
}

/// Checks `source` against `recorded`: one `fstat` and one `stat` for a host file.
pub(crate) fn check(source: &dyn Source, recorded: &SourceMeta) -> std::io::Result<Staleness> {
    match source.metadata() {
        Ok(now) => {
            let d = diff(recorded, &now);
            Ok(if d.is_empty() {
                Staleness::Unchanged
            } else {
                Staleness::Changed(d)
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Staleness::Gone),
        Err(e) => Err(e),
    }
}
