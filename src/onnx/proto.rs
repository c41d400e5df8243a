//! The protobuf wire format, for the few ONNX messages finprint writes: varints, tagged
//! fields and length-delimited nested messages (`onnx.proto`'s field numbers are the callers').

/// One message being written.
#[derive(Default)]
pub struct Message(Vec<u8>);

const VARINT: u32 = 0;
const FIXED32: u32 = 5;
const BYTES: u32 = 2;

impl Message {
    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.0.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
    }

    fn tag(&mut self, field: u32, wire: u32) {
        self.varint(u64::from(field << 3 | wire));
    }

    /// An `int64` or `int32` field (negative values as ten-byte two's complement, as protobuf).
    pub fn int(&mut self, field: u32, v: i64) -> &mut Self {
        self.tag(field, VARINT);
        self.varint(v as u64);
        self
    }

    pub fn float(&mut self, field: u32, v: f32) -> &mut Self {
        self.tag(field, FIXED32);
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn bytes(&mut self, field: u32, v: &[u8]) -> &mut Self {
        self.tag(field, BYTES);
        self.varint(v.len() as u64);
        self.0.extend_from_slice(v);
        self
    }

    pub fn string(&mut self, field: u32, v: &str) -> &mut Self {
        self.bytes(field, v.as_bytes())
    }

    pub fn message(&mut self, field: u32, m: &Message) -> &mut Self {
        self.bytes(field, &m.0)
    }

    /// A packed repeated `int64` field.
    pub fn packed_ints(&mut self, field: u32, vs: &[i64]) -> &mut Self {
        let mut packed = Message::default();
        for &v in vs {
            packed.varint(v as u64);
        }
        self.bytes(field, &packed.0)
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_encode_as_the_protobuf_reference_examples() {
        // The protobuf encoding guide's examples: field 1 = 150 is 08 96 01; field 2 = "testing"
        // is 12 07 74 65 73 74 69 6e 67; field 4 packed [3, 270, 86942] is 22 06 03 8E 02 9E A7 05.
        let mut m = Message::default();
        m.int(1, 150);
        assert_eq!(m.into_bytes(), [0x08, 0x96, 0x01]);
        let mut m = Message::default();
        m.string(2, "testing");
        assert_eq!(m.into_bytes(), b"\x12\x07testing");
        let mut m = Message::default();
        m.packed_ints(4, &[3, 270, 86942]);
        assert_eq!(
            m.into_bytes(),
            [0x22, 0x06, 0x03, 0x8E, 0x02, 0x9E, 0xA7, 0x05]
        );
        let mut m = Message::default();
        m.int(3, -1).float(2, 1.0);
        let mut want = vec![0x18];
        want.extend([0xFF; 9]);
        want.extend([0x01, 0x15, 0x00, 0x00, 0x80, 0x3F]);
        assert_eq!(m.into_bytes(), want);
    }
}
