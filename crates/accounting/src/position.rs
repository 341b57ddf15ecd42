//! Where a record sits in the segmented accounting log.

use serde::{Deserialize, Serialize};

/// A place in the accounting log: a segment's sequence number and a byte offset into it
/// (uncompressed). Positions order as the records were written, across rotations: every
/// record of segment `n` comes before every record of segment `n + 1`.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Position {
    /// The segment's sequence number (the current file's, or a closed `<path>.<segment>`).
    pub segment: u64,
    /// Bytes into the segment.
    pub offset: u64,
}

impl Position {
    /// A position.
    pub fn new(segment: u64, offset: u64) -> Position {
        Position { segment, offset }
    }

    /// Sixteen bytes (segment then offset, big-endian) for storing in the spool.
    pub fn to_bytes(self) -> [u8; 16] {
        let mut out = [0u8; 16];
        out[..8].copy_from_slice(&self.segment.to_be_bytes());
        out[8..].copy_from_slice(&self.offset.to_be_bytes());
        out
    }

    /// Reads [`Position::to_bytes`]. Eight bytes are an offset into segment 0: the
    /// checkpoint of the single-file layout before segments.
    pub fn from_bytes(bytes: &[u8]) -> Option<Position> {
        match bytes.len() {
            8 => Some(Position::new(0, u64::from_be_bytes(bytes.try_into().ok()?))),
            16 => Some(Position::new(
                u64::from_be_bytes(bytes[..8].try_into().ok()?),
                u64::from_be_bytes(bytes[8..].try_into().ok()?),
            )),
            _ => None,
        }
    }
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.segment, self.offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_order_across_segments_and_round_trip() {
        assert!(Position::new(1, 900) < Position::new(2, 0));
        assert!(Position::new(2, 5) < Position::new(2, 6));
        let p = Position::new(7, 123_456);
        assert_eq!(Position::from_bytes(&p.to_bytes()), Some(p));
        assert_eq!(
            Position::from_bytes(&42u64.to_be_bytes()),
            Some(Position::new(0, 42))
        );
        assert_eq!(Position::from_bytes(b"short"), None);
    }
}
