//! A walk over a DICOM file's element headers, before dicom-rs parses it: every defined length must fit in
//! what is left of the file. dicom-rs allocates (and zeroes) a value's claimed length before it reads it, so
//! without this a 100-byte upload claiming a 4 GiB element costs 4 GiB; here it is refused at no cost.

use std::io::Read;

use dicom_core::dictionary::{DataDictionary, DataDictionaryEntry, VirtualVr};
use dicom_core::{Tag, VR};
use dicom_dictionary_std::StandardDataDictionary;

#[derive(Clone, Copy, PartialEq)]
enum Encoding {
    ExplicitLittle,
    ImplicitLittle,
    ExplicitBig,
}

const UNDEFINED: u32 = 0xFFFF_FFFF;
const ITEM: (u16, u16) = (0xFFFE, 0xE000);
const ITEM_END: (u16, u16) = (0xFFFE, 0xE00D);
const SEQUENCE_END: (u16, u16) = (0xFFFE, 0xE0DD);
/// Deeper nesting than any real file has.
const MAX_DEPTH: usize = 32;

/// An element header: its tag, its VR when known, its length, and the header's own bytes.
struct Header {
    tag: (u16, u16),
    vr: Option<VR>,
    length: u32,
    size: usize,
}

struct Walk<'a> {
    data: &'a [u8],
    encoding: Encoding,
}

/// Checks every element length in `file` (a Part 10 file; anything else is left to the parser to refuse).
/// A deflated data set is inflated up to `max_inflated` bytes to be checked.
pub fn check_lengths(file: &[u8], max_inflated: u64) -> Result<(), String> {
    let start = if file.get(128..132) == Some(b"DICM") {
        132
    } else if file.starts_with(b"DICM") {
        4
    } else {
        return Ok(());
    };
    // the meta group: explicit VR little endian
    let meta = Walk {
        data: file,
        encoding: Encoding::ExplicitLittle,
    };
    let mut at = start;
    let mut transfer_syntax = String::new();
    while at + 8 <= file.len() && u16::from_le_bytes([file[at], file[at + 1]]) == 0x0002 {
        let Header {
            tag,
            vr,
            length,
            size,
        } = meta.header(at)?;
        let value = at + size;
        if length == UNDEFINED || length as usize > file.len() - value {
            return Err(format!("meta element {tag:?} claims {length} bytes"));
        }
        if tag == (0x0002, 0x0010) && vr != Some(VR::SQ) {
            transfer_syntax = String::from_utf8_lossy(&file[value..value + length as usize])
                .trim_matches(|c: char| c == '\0' || c.is_whitespace())
                .to_owned();
        }
        at = value + length as usize;
    }
    let body = &file[at.min(file.len())..];
    match transfer_syntax.as_str() {
        "1.2.840.10008.1.2" => Walk::new(body, Encoding::ImplicitLittle).all(),
        "1.2.840.10008.1.2.2" => Walk::new(body, Encoding::ExplicitBig).all(),
        "1.2.840.10008.1.2.1.99" => {
            let mut inflated = Vec::new();
            flate2::read::DeflateDecoder::new(body)
                .take(max_inflated + 1)
                .read_to_end(&mut inflated)
                .map_err(|e| format!("the deflated data set does not inflate: {e}"))?;
            if inflated.len() as u64 > max_inflated {
                return Err(format!(
                    "the deflated data set inflates past {max_inflated} bytes"
                ));
            }
            Walk::new(&inflated, Encoding::ExplicitLittle).all()
        }
        // every other transfer syntax encodes the data set in explicit VR little endian
        _ => Walk::new(body, Encoding::ExplicitLittle).all(),
    }
}

impl<'a> Walk<'a> {
    fn new(data: &'a [u8], encoding: Encoding) -> Self {
        Walk { data, encoding }
    }

    fn all(&self) -> Result<(), String> {
        let mut at = 0;
        self.elements(&mut at, self.data.len(), 0)
    }

    fn u16_at(&self, at: usize) -> u16 {
        let b = [self.data[at], self.data[at + 1]];
        if self.encoding == Encoding::ExplicitBig {
            u16::from_be_bytes(b)
        } else {
            u16::from_le_bytes(b)
        }
    }

    fn u32_at(&self, at: usize) -> u32 {
        let b = [
            self.data[at],
            self.data[at + 1],
            self.data[at + 2],
            self.data[at + 3],
        ];
        if self.encoding == Encoding::ExplicitBig {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        }
    }

    /// `(tag, VR if known, length, header bytes)` of the element at `at` (the caller checks 8 bytes exist).
    fn header(&self, at: usize) -> Result<Header, String> {
        let tag = (self.u16_at(at), self.u16_at(at + 2));
        if tag.0 == 0xFFFE || self.encoding == Encoding::ImplicitLittle {
            let vr = StandardDataDictionary
                .by_tag(Tag(tag.0, tag.1))
                .and_then(|entry| match entry.vr() {
                    VirtualVr::Exact(vr) => Some(vr),
                    _ => None,
                });
            return Ok(Header {
                tag,
                vr,
                length: self.u32_at(at + 4),
                size: 8,
            });
        }
        // an unknown VR is read as UN, with a 4-byte length, as dicom-rs reads it
        let vr = Some(VR::from_binary([self.data[at + 4], self.data[at + 5]]).unwrap_or(VR::UN));
        let long = matches!(
            vr,
            Some(
                VR::OB
                    | VR::OD
                    | VR::OF
                    | VR::OL
                    | VR::OV
                    | VR::OW
                    | VR::SQ
                    | VR::UC
                    | VR::UN
                    | VR::UR
                    | VR::UT
                    | VR::SV
                    | VR::UV
            )
        );
        if long {
            if at + 12 > self.data.len() {
                return Err(format!("element {tag:04X?} is cut short"));
            }
            Ok(Header {
                tag,
                vr,
                length: self.u32_at(at + 8),
                size: 12,
            })
        } else {
            Ok(Header {
                tag,
                vr,
                length: u32::from(self.u16_at(at + 6)),
                size: 8,
            })
        }
    }

    /// Elements from `at` to `end`, or to an item delimiter (which is consumed).
    fn elements(&self, at: &mut usize, end: usize, depth: usize) -> Result<(), String> {
        if depth > MAX_DEPTH {
            return Err(format!("sequences nested more than {MAX_DEPTH} deep"));
        }
        while *at < end {
            if *at + 8 > self.data.len() {
                // cut short: the parser says so
                return Ok(());
            }
            let Header {
                tag,
                vr,
                length,
                size,
            } = self.header(*at)?;
            *at += size;
            if tag == ITEM_END || tag == SEQUENCE_END {
                return Ok(());
            }
            if length == UNDEFINED {
                // a sequence, an undefined-length UN (a sequence in implicit VR), or encapsulated pixel data
                let fragments = tag == (0x7FE0, 0x0010);
                self.items(at, None, fragments, depth + 1)?;
                continue;
            }
            let remaining = end.min(self.data.len()).saturating_sub(*at);
            if length as usize > remaining {
                return Err(format!(
                    "element {tag:04X?} claims {length} bytes where {remaining} remain"
                ));
            }
            let value_end = *at + length as usize;
            if vr == Some(VR::SQ) {
                self.items(at, Some(value_end), false, depth + 1)?;
            }
            *at = value_end;
        }
        Ok(())
    }

    /// Items up to `end` (a defined-length sequence) or to the sequence delimiter.
    fn items(
        &self,
        at: &mut usize,
        end: Option<usize>,
        fragments: bool,
        depth: usize,
    ) -> Result<(), String> {
        if depth > MAX_DEPTH {
            return Err(format!("sequences nested more than {MAX_DEPTH} deep"));
        }
        loop {
            if end.is_some_and(|end| *at >= end) || *at + 8 > self.data.len() {
                return Ok(());
            }
            let tag = (self.u16_at(*at), self.u16_at(*at + 2));
            let length = self.u32_at(*at + 4);
            *at += 8;
            match tag {
                SEQUENCE_END => return Ok(()),
                ITEM if length == UNDEFINED && !fragments => {
                    self.elements(at, end.unwrap_or(self.data.len()), depth + 1)?
                }
                ITEM => {
                    let remaining = end
                        .unwrap_or(self.data.len())
                        .min(self.data.len())
                        .saturating_sub(*at);
                    if length == UNDEFINED || length as usize > remaining {
                        return Err(format!(
                            "an item claims {length} bytes where {remaining} remain"
                        ));
                    }
                    let item_end = *at + length as usize;
                    if !fragments {
                        self.elements(at, item_end, depth + 1)?;
                    }
                    *at = item_end;
                }
                // not an item: the parser will say what is wrong
                _ => return Ok(()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn explicit_file(elements: &[u8]) -> Vec<u8> {
        let mut file = vec![0u8; 128];
        file.extend_from_slice(b"DICM");
        let ts = b"1.2.840.10008.1.2.1\0";
        file.extend_from_slice(&[0x02, 0x00, 0x10, 0x00, b'U', b'I']);
        file.extend_from_slice(&(ts.len() as u16).to_le_bytes());
        file.extend_from_slice(ts);
        file.extend_from_slice(elements);
        file
    }

    #[test]
    fn a_claimed_length_past_the_file_is_refused() {
        // (0010,0010) PN of 4 bytes: fine; (7FE0,0010) OB claiming 4 GiB: refused
        let mut ok = vec![0x10, 0x00, 0x10, 0x00, b'P', b'N', 4, 0];
        ok.extend_from_slice(b"A^B ");
        assert!(check_lengths(&explicit_file(&ok), 1 << 20).is_ok());
        let mut bomb = ok.clone();
        bomb.extend_from_slice(&[
            0xE0, 0x7F, 0x10, 0x00, b'O', b'B', 0, 0, 0xF0, 0xFF, 0xFF, 0xFF,
        ]);
        let error = check_lengths(&explicit_file(&bomb), 1 << 20).unwrap_err();
        assert!(error.contains("claims"), "{error}");
        // inside a sequence item too
        let mut nested = vec![
            0x08, 0x00, 0x15, 0x11, b'S', b'Q', 0, 0, 0xFF, 0xFF, 0xFF, 0xFF,
        ];
        nested.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0, 0xFF, 0xFF, 0xFF, 0xFF]);
        nested.extend_from_slice(&[
            0x08, 0x00, 0x50, 0x11, b'U', b'T', 0, 0, 0x00, 0x00, 0x00, 0x40,
        ]);
        assert!(check_lengths(&explicit_file(&nested), 1 << 20).is_err());
    }

    #[test]
    fn the_fixture_series_passes() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/dicom");
        for name in [
            "ct_series_j2k/slice_00.dcm",
            "enhanced_ct_3frames.dcm",
            "transfer_syntaxes/slice10_implicit_le.dcm",
            "transfer_syntaxes/slice10_explicit_be.dcm",
            "transfer_syntaxes/slice10_deflated.dcm",
            "colour_rgb.dcm",
        ] {
            let file = std::fs::read(dir.join(name)).unwrap();
            check_lengths(&file, 1 << 30).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }
}
