//! Vanguard's snapshot state file: a versioned header, a list of sections each with its own
//! tag and version, and a CRC-32 over everything (docs/snapshot.md is the specification).
//!
//! This crate knows the container only: how sections are framed, checked and found, and the
//! little-endian encoding their payloads use ([`Encoder`], [`Decoder`]). What each section holds
//! is decided by the VMM, which writes every section at its newest version and reads every
//! version it ever wrote (the compatibility rule: a newer Vanguard restores an older snapshot).

/// The first eight bytes of a state file.
pub const MAGIC: [u8; 8] = *b"VANGSNAP";
/// The last eight bytes, after the checksum.
pub const END_MAGIC: [u8; 8] = *b"SNAPEND\n";
/// The container version this code writes; it reads every version from 1 to this.
pub const FORMAT_VERSION: u32 = 1;
/// Section flag: a reader that does not know the section's tag must refuse the file (an
/// unknown section without it is skipped).
pub const FLAG_REQUIRED: u16 = 1;

const HEADER_LEN: usize = 16;
const SECTION_HEADER_LEN: usize = 24;
const TRAILER_LEN: usize = 12;

/// What is wrong with a state file.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SnapshotError {
    /// The magic is missing.
    #[error("not a Vanguard snapshot state file (no VANGSNAP magic)")]
    NotASnapshot,
    /// Written by a newer format.
    #[error("snapshot format version {found} is newer than this Vanguard reads (1 to {max})")]
    UnsupportedFormat { found: u32, max: u32 },
    /// The file ends early.
    #[error("the state file is truncated ({what})")]
    Truncated { what: String },
    /// The checksum does not match.
    #[error("the state file is corrupt: CRC-32 {computed:#010x} of its contents differs from the stored {stored:#010x}")]
    Checksum { stored: u32, computed: u32 },
    /// A section this reader does not know, marked required.
    #[error("section `{tag}` (version {version}) is required but unknown to this Vanguard")]
    UnknownRequired { tag: String, version: u16 },
    /// A known section at a version newer than this reader's.
    #[error("section `{tag}` has version {found}; this Vanguard reads versions 1 to {max}")]
    SectionVersion { tag: String, found: u16, max: u16 },
    /// A section's payload does not decode.
    #[error("section `{tag}` is malformed: {what}")]
    Malformed { tag: String, what: String },
    /// A section the reader needs is absent.
    #[error("the snapshot has no `{tag}` section")]
    Missing { tag: String },
    /// A tag that cannot be written (empty, too long, not ASCII).
    #[error("invalid section tag `{0}` (1 to 8 ASCII characters)")]
    BadTag(String),
}

fn tag_bytes(tag: &str) -> Result<[u8; 8], SnapshotError> {
    let mut out = [0u8; 8];
    if tag.is_empty() || tag.len() > 8 || !tag.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(SnapshotError::BadTag(tag.to_string()));
    }
    out[..tag.len()].copy_from_slice(tag.as_bytes());
    Ok(out)
}

/// Builds a state file section by section.
#[derive(Debug)]
pub struct Writer {
    buf: Vec<u8>,
    count: u32,
}

impl Default for Writer {
    fn default() -> Self {
        Self::new()
    }
}

impl Writer {
    /// An empty file: the header, no sections yet.
    pub fn new() -> Self {
        let mut buf = Vec::with_capacity(64 << 10);
        buf.extend_from_slice(&MAGIC);
        buf.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        buf.extend_from_slice(&0u32.to_le_bytes()); // section count, set by finish
        Self { buf, count: 0 }
    }

    /// Appends a section.
    pub fn section(
        &mut self,
        tag: &str,
        version: u16,
        flags: u16,
        payload: &[u8],
    ) -> Result<(), SnapshotError> {
        self.buf.extend_from_slice(&tag_bytes(tag)?);
        self.buf.extend_from_slice(&version.to_le_bytes());
        self.buf.extend_from_slice(&flags.to_le_bytes());
        self.buf.extend_from_slice(&0u32.to_le_bytes());
        self.buf.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        self.buf.extend_from_slice(payload);
        self.count += 1;
        Ok(())
    }

    /// The finished file: section count filled in, checksum and end magic appended.
    pub fn finish(mut self) -> Vec<u8> {
        self.buf[12..16].copy_from_slice(&self.count.to_le_bytes());
        let crc = crc32fast::hash(&self.buf);
        self.buf.extend_from_slice(&crc.to_le_bytes());
        self.buf.extend_from_slice(&END_MAGIC);
        self.buf
    }
}

/// One section of a parsed file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section<'a> {
    /// Its tag (NUL padding removed).
    pub tag: String,
    /// Its version.
    pub version: u16,
    /// Its flags ([`FLAG_REQUIRED`]).
    pub flags: u16,
    /// Its payload.
    pub payload: &'a [u8],
}

impl<'a> Section<'a> {
    /// A decoder over the payload that names this section in its errors.
    pub fn decoder(&self) -> Decoder<'a> {
        Decoder { tag: self.tag.clone(), data: self.payload, pos: 0 }
    }
}

/// A checked state file.
#[derive(Debug)]
pub struct Snapshot<'a> {
    /// The container version it was written with.
    pub format_version: u32,
    /// Its sections, in file order.
    pub sections: Vec<Section<'a>>,
}

fn le_u32(bytes: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(b)
}

impl<'a> Snapshot<'a> {
    /// Checks the magic, the format version, the checksum and every section's framing.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, SnapshotError> {
        if bytes.len() < 8 || bytes[..8] != MAGIC {
            return Err(SnapshotError::NotASnapshot);
        }
        if bytes.len() < HEADER_LEN + TRAILER_LEN {
            return Err(SnapshotError::Truncated {
                what: "shorter than header and trailer".into(),
            });
        }
        let format_version = le_u32(bytes, 8);
        if format_version == 0 || format_version > FORMAT_VERSION {
            return Err(SnapshotError::UnsupportedFormat {
                found: format_version,
                max: FORMAT_VERSION,
            });
        }
        let body_end = bytes.len() - TRAILER_LEN;
        if bytes[body_end + 4..] != END_MAGIC {
            return Err(SnapshotError::Truncated { what: "no end marker".into() });
        }
        let stored = le_u32(bytes, body_end);
        let computed = crc32fast::hash(&bytes[..body_end]);
        if stored != computed {
            return Err(SnapshotError::Checksum { stored, computed });
        }
        let count = le_u32(bytes, 12);
        let mut sections = Vec::new();
        let mut pos = HEADER_LEN;
        for index in 0..count {
            let header = bytes
                .get(pos..pos + SECTION_HEADER_LEN)
                .filter(|_| pos.checked_add(SECTION_HEADER_LEN).is_some_and(|end| end <= body_end));
            let Some(header) = header else {
                return Err(SnapshotError::Truncated {
                    what: format!("section {index} of {count} has no header"),
                });
            };
            let tag = String::from_utf8_lossy(&header[..8]).trim_end_matches('\0').to_string();
            let version = u16::from_le_bytes([header[8], header[9]]);
            let flags = u16::from_le_bytes([header[10], header[11]]);
            let mut len = [0u8; 8];
            len.copy_from_slice(&header[16..24]);
            let len = u64::from_le_bytes(len);
            let start = pos + SECTION_HEADER_LEN;
            let end = usize::try_from(len)
                .ok()
                .and_then(|l| start.checked_add(l))
                .filter(|end| *end <= body_end)
                .ok_or_else(|| SnapshotError::Truncated {
                    what: format!("section `{tag}` claims {len} bytes"),
                })?;
            sections.push(Section { tag, version, flags, payload: &bytes[start..end] });
            pos = end;
        }
        if pos != body_end {
            return Err(SnapshotError::Malformed {
                tag: "(file)".into(),
                what: format!("{} bytes after the last section", body_end - pos),
            });
        }
        Ok(Self { format_version, sections })
    }

    /// Applies the compatibility rule against what this reader knows (tag and newest version
    /// read): a known section newer than that, or an unknown required one, is refused; an
    /// unknown optional one is left alone.
    pub fn check_known(&self, known: &[(&str, u16)]) -> Result<(), SnapshotError> {
        for s in &self.sections {
            match known.iter().find(|(tag, _)| *tag == s.tag) {
                Some((_, max)) if s.version == 0 || s.version > *max => {
                    return Err(SnapshotError::SectionVersion {
                        tag: s.tag.clone(),
                        found: s.version,
                        max: *max,
                    })
                }
                Some(_) => {}
                None if s.flags & FLAG_REQUIRED != 0 => {
                    return Err(SnapshotError::UnknownRequired {
                        tag: s.tag.clone(),
                        version: s.version,
                    })
                }
                None => {}
            }
        }
        Ok(())
    }

    /// The first section with `tag`.
    pub fn one(&self, tag: &str) -> Result<&Section<'a>, SnapshotError> {
        self.sections
            .iter()
            .find(|s| s.tag == tag)
            .ok_or_else(|| SnapshotError::Missing { tag: tag.to_string() })
    }

    /// Every section with `tag`, in file order.
    pub fn all<'s>(&'s self, tag: &'s str) -> impl Iterator<Item = &'s Section<'a>> + 's {
        self.sections.iter().filter(move |s| s.tag == tag)
    }
}

/// Builds a section's payload: little-endian integers, length-prefixed byte strings.
#[derive(Debug, Default)]
pub struct Encoder(pub Vec<u8>);

impl Encoder {
    /// An empty payload.
    pub fn new() -> Self {
        Self::default()
    }
    /// One byte.
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    /// Two bytes.
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Four bytes.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Eight bytes.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// A u32 length, then the bytes.
    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.u32(u32::try_from(v.len()).unwrap_or(u32::MAX));
        self.0.extend_from_slice(&v[..v.len().min(u32::MAX as usize)]);
        self
    }
    /// A string as [`Encoder::bytes`] of its UTF-8.
    pub fn str(&mut self, v: &str) -> &mut Self {
        self.bytes(v.as_bytes())
    }
}

/// Reads a section's payload; every error names the section and what was being read.
#[derive(Debug)]
pub struct Decoder<'a> {
    tag: String,
    data: &'a [u8],
    pos: usize,
}

impl<'a> Decoder<'a> {
    /// A decoder over `data`, a part of section `tag` (a nested record), naming it in errors.
    pub fn new(tag: impl Into<String>, data: &'a [u8]) -> Self {
        Decoder { tag: tag.into(), data, pos: 0 }
    }

    /// An error about this section.
    pub fn malformed(&self, what: impl Into<String>) -> SnapshotError {
        SnapshotError::Malformed { tag: self.tag.clone(), what: what.into() }
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], SnapshotError> {
        let end = self.pos.checked_add(n).filter(|e| *e <= self.data.len()).ok_or_else(|| {
            self.malformed(format!("ends in {what} (at byte {}, {n} more wanted)", self.pos))
        })?;
        let out = &self.data[self.pos..end];
        self.pos = end;
        Ok(out)
    }
    /// One byte.
    pub fn u8(&mut self, what: &str) -> Result<u8, SnapshotError> {
        Ok(self.take(1, what)?[0])
    }
    /// Two bytes.
    pub fn u16(&mut self, what: &str) -> Result<u16, SnapshotError> {
        let b = self.take(2, what)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    /// Four bytes.
    pub fn u32(&mut self, what: &str) -> Result<u32, SnapshotError> {
        let mut b = [0u8; 4];
        b.copy_from_slice(self.take(4, what)?);
        Ok(u32::from_le_bytes(b))
    }
    /// Eight bytes.
    pub fn u64(&mut self, what: &str) -> Result<u64, SnapshotError> {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.take(8, what)?);
        Ok(u64::from_le_bytes(b))
    }
    /// A length-prefixed byte string.
    pub fn bytes(&mut self, what: &str) -> Result<&'a [u8], SnapshotError> {
        let len = self.u32(what)?;
        self.take(usize::try_from(len).unwrap_or(usize::MAX), what)
    }
    /// A length-prefixed byte string that must be exactly `len` bytes (a fixed-layout
    /// structure).
    pub fn exact(&mut self, len: usize, what: &str) -> Result<&'a [u8], SnapshotError> {
        let b = self.bytes(what)?;
        if b.len() != len {
            return Err(self.malformed(format!("{what} is {} bytes, not {len}", b.len())));
        }
        Ok(b)
    }
    /// A UTF-8 string.
    pub fn str(&mut self, what: &str) -> Result<&'a str, SnapshotError> {
        let b = self.bytes(what)?;
        std::str::from_utf8(b).map_err(|_| self.malformed(format!("{what} is not UTF-8")))
    }
    /// A count of items each at least `min_item` bytes long, checked against what is left (so a
    /// hostile count cannot make the reader allocate without bound).
    pub fn count(&mut self, min_item: usize, what: &str) -> Result<usize, SnapshotError> {
        let n = usize::try_from(self.u32(what)?).unwrap_or(usize::MAX);
        let left = self.data.len() - self.pos;
        if n.checked_mul(min_item.max(1)).is_none_or(|need| need > left) {
            return Err(self.malformed(format!("{what}: {n} items cannot fit in {left} bytes")));
        }
        Ok(n)
    }
    /// Fails if bytes are left over (a payload longer than its version defines).
    pub fn finish(self) -> Result<(), SnapshotError> {
        if self.pos != self.data.len() {
            return Err(self.malformed(format!(
                "{} bytes left over after the last field",
                self.data.len() - self.pos
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut w = Writer::new();
        let mut e = Encoder::new();
        e.u8(1).u16(2).u32(3).u64(4).bytes(b"abc").str("é");
        w.section("machine", 1, FLAG_REQUIRED, &e.0).unwrap();
        w.section("extra", 3, 0, b"opaque").unwrap();
        w.finish()
    }

    #[test]
    fn round_trip() {
        let bytes = sample();
        let snap = Snapshot::parse(&bytes).unwrap();
        assert_eq!(snap.sections.len(), 2);
        let mut d = snap.one("machine").unwrap().decoder();
        assert_eq!(d.u8("a").unwrap(), 1);
        assert_eq!(d.u16("b").unwrap(), 2);
        assert_eq!(d.u32("c").unwrap(), 3);
        assert_eq!(d.u64("d").unwrap(), 4);
        assert_eq!(d.bytes("e").unwrap(), b"abc");
        assert_eq!(d.str("f").unwrap(), "é");
        d.finish().unwrap();
        // An unknown optional section is skipped; an unknown required one refused.
        snap.check_known(&[("machine", 1)]).unwrap();
        assert_eq!(
            snap.check_known(&[("extra", 3)]),
            Err(SnapshotError::UnknownRequired { tag: "machine".into(), version: 1 })
        );
        assert_eq!(
            snap.check_known(&[("machine", 1), ("extra", 2)]),
            Err(SnapshotError::SectionVersion { tag: "extra".into(), found: 3, max: 2 })
        );
    }

    #[test]
    fn every_flipped_byte_is_caught() {
        let good = sample();
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x40;
            assert!(Snapshot::parse(&bad).is_err(), "flipping byte {i} went unnoticed");
        }
        for len in 0..good.len() {
            assert!(Snapshot::parse(&good[..len]).is_err(), "truncation to {len} accepted");
        }
    }

    #[test]
    fn newer_format_refused_with_versions() {
        let mut bytes = sample();
        bytes[8] = 9;
        assert_eq!(
            Snapshot::parse(&bytes).unwrap_err(),
            SnapshotError::UnsupportedFormat { found: 9, max: FORMAT_VERSION }
        );
    }

    #[test]
    fn hostile_counts_and_lengths() {
        let mut e = Encoder::new();
        e.u32(u32::MAX);
        let mut w = Writer::new();
        w.section("x", 1, 0, &e.0).unwrap();
        let bytes = w.finish();
        let snap = Snapshot::parse(&bytes).unwrap();
        let err = snap.one("x").unwrap().decoder().count(8, "entries").unwrap_err();
        assert!(err.to_string().contains("cannot fit"), "{err}");
        let err = snap.one("x").unwrap().decoder().bytes("blob").unwrap_err();
        assert!(err.to_string().contains("ends in blob"), "{err}");
        assert!(snap.one("y").is_err());
        assert!(Writer::new().section("", 1, 0, b"").is_err());
        assert!(Writer::new().section("ninechars", 1, 0, b"").is_err());
    }
}
