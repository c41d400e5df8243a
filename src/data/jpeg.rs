//! A check of a JPEG's entropy-coded data, which decoders forgive: they fill a scan that ends
//! early with grey or zeros, and skip the extra bytes that corruption leaves before a marker.
//! For baseline and extended sequential Huffman JPEGs (what cameras write) every Huffman code
//! is walked without decoding a pixel: a scan must hold exactly its blocks, each of at most 64
//! coefficients, and end at its marker (restart intervals included). Other kinds of JPEG are
//! only checked for their structure.

/// Check a JPEG as the module says; the error says what is wrong, for a person.
pub fn check_jpeg(bytes: &[u8]) -> Result<(), String> {
    Checker::default().run(bytes)
}

#[derive(Clone, Copy, Default)]
struct Component {
    id: u8,
    h: usize,
    v: usize,
}

/// A Huffman table as a lookup of every 16-bit prefix: (code length, symbol); length 0 where
/// no code starts so.
struct Table(Vec<(u8, u8)>);

impl Table {
    fn new(counts: &[u8; 16], symbols: &[u8]) -> Result<Self, String> {
        let mut lookup = vec![(0u8, 0u8); 1 << 16];
        let mut code: u32 = 0;
        let mut k = 0;
        for (i, &n) in counts.iter().enumerate() {
            let len = i as u32 + 1;
            for _ in 0..n {
                if code >= 1 << len {
                    return Err("bad Huffman table".into());
                }
                let shift = 16 - len;
                let start = (code << shift) as usize;
                for e in &mut lookup[start..start + (1 << shift)] {
                    *e = (len as u8, symbols[k]);
                }
                k += 1;
                code += 1;
            }
            code <<= 1;
        }
        Ok(Table(lookup))
    }
}

#[derive(Default)]
struct Checker {
    /// Sequential Huffman frame: its scans are checked.
    sequential: bool,
    frame: Option<(usize, usize, Vec<Component>)>,
    dc: [Option<Table>; 4],
    ac: [Option<Table>; 4],
    restart: usize,
}

fn u16_at(b: &[u8], i: usize) -> Result<usize, String> {
    match b.get(i..i + 2) {
        Some(s) => Ok(usize::from(u16::from_be_bytes([s[0], s[1]]))),
        None => Err(TRUNCATED.into()),
    }
}

const TRUNCATED: &str = "truncated JPEG (it ends before its end-of-image marker)";
/// Image data that ends before its last block: cut short, or decoded out of step by corruption.
const ENDS_EARLY: &str = "truncated or corrupt JPEG (its image data ends early)";

impl Checker {
    fn run(mut self, b: &[u8]) -> Result<(), String> {
        if !b.starts_with(&[0xFF, 0xD8]) {
            return Err("not a JPEG".into());
        }
        let mut pos = 2;
        let mut scans = 0;
        loop {
            // A marker: 0xFF (fill bytes allowed), then its code.
            if b.get(pos) != Some(&0xFF) {
                return Err(match b.get(pos) {
                    None => TRUNCATED.into(),
                    Some(_) => "corrupt JPEG (data where a marker should be)".into(),
                });
            }
            while b.get(pos) == Some(&0xFF) {
                pos += 1;
            }
            let marker = *b.get(pos).ok_or(TRUNCATED)?;
            pos += 1;
            match marker {
                0xD9 => {
                    return if scans == 0 {
                        Err("JPEG without image data".into())
                    } else {
                        Ok(())
                    };
                }
                0xD0..=0xD7 | 0x01 => continue,
                _ => {}
            }
            let len = u16_at(b, pos)?;
            let segment = b
                .get(pos + 2..pos + len)
                .filter(|_| len >= 2)
                .ok_or(TRUNCATED)?;
            pos += len;
            match marker {
                0xC0 | 0xC1 => self.frame(segment, true)?,
                0xC2 | 0xC3 | 0xC5..=0xC7 | 0xC9..=0xCB | 0xCD..=0xCF => {
                    self.frame(segment, false)?
                }
                0xC4 => self.tables(segment)?,
                0xDD => {
                    self.restart = u16_at(segment, 0)?;
                }
                0xDA => {
                    scans += 1;
                    pos = self.scan(segment, b, pos)?;
                }
                _ => {}
            }
        }
    }

    fn frame(&mut self, s: &[u8], sequential: bool) -> Result<(), String> {
        const BAD: &str = "corrupt JPEG (bad frame header)";
        if self.frame.is_some() {
            return Err("corrupt JPEG (two frame headers)".into());
        }
        let n = usize::from(*s.get(5).ok_or(BAD)?);
        if s.len() < 6 + 3 * n || n == 0 {
            return Err(BAD.into());
        }
        let (height, width) = (u16_at(s, 1)?, u16_at(s, 3)?);
        if width == 0 || height == 0 {
            return Err("JPEG of no pixels".into());
        }
        let comps = (0..n)
            .map(|i| {
                let c = &s[6 + 3 * i..];
                Component {
                    id: c[0],
                    h: usize::from(c[1] >> 4),
                    v: usize::from(c[1] & 15),
                }
            })
            .collect::<Vec<_>>();
        if comps
            .iter()
            .any(|c| !(1..=4).contains(&c.h) || !(1..=4).contains(&c.v))
        {
            return Err(BAD.into());
        }
        self.sequential = sequential;
        self.frame = Some((width, height, comps));
        Ok(())
    }

    fn tables(&mut self, mut s: &[u8]) -> Result<(), String> {
        const BAD: &str = "corrupt JPEG (bad Huffman table)";
        while !s.is_empty() {
            let (class, id) = (s[0] >> 4, usize::from(s[0] & 15));
            let counts: [u8; 16] = s.get(1..17).ok_or(BAD)?.try_into().map_err(|_| BAD)?;
            let total: usize = counts.iter().map(|&c| usize::from(c)).sum();
            let symbols = s.get(17..17 + total).ok_or(BAD)?;
            if id > 3 || class > 1 {
                return Err(BAD.into());
            }
            let table = Some(Table::new(&counts, symbols)?);
            if class == 0 {
                self.dc[id] = table;
            } else {
                self.ac[id] = table;
            }
            s = &s[17 + total..];
        }
        Ok(())
    }

    /// Walk one scan whose data starts at `pos`; returns where its closing marker starts.
    fn scan(&self, s: &[u8], b: &[u8], pos: usize) -> Result<usize, String> {
        const BAD: &str = "corrupt JPEG (bad scan header)";
        let Some((width, height, comps)) = &self.frame else {
            return Err("corrupt JPEG (scan before the frame header)".into());
        };
        if !self.sequential {
            return Ok(skip_entropy_data(b, pos));
        }
        let n = usize::from(*s.first().ok_or(BAD)?);
        if n == 0 || n > 4 || s.len() < 1 + 2 * n + 3 {
            return Err(BAD.into());
        }
        let hmax = comps.iter().map(|c| c.h).max().unwrap_or(1);
        let vmax = comps.iter().map(|c| c.v).max().unwrap_or(1);
        // Each of the scan's components: (tables, blocks per MCU as (h, v)).
        let mut parts = Vec::new();
        for i in 0..n {
            let (id, t) = (s[1 + 2 * i], s[2 + 2 * i]);
            let c = comps.iter().find(|c| c.id == id).ok_or(BAD)?;
            let dc = self.dc[usize::from(t >> 4) & 3].as_ref();
            let ac = self.ac[usize::from(t & 15) & 3].as_ref();
            let (Some(dc), Some(ac)) = (dc, ac) else {
                return Err("corrupt JPEG (a scan uses a missing Huffman table)".into());
            };
            parts.push((dc, ac, *c));
        }
        let (mcus, per_mcu): (usize, Vec<usize>) = if n == 1 {
            let c = parts[0].2;
            let w = (width * c.h).div_ceil(hmax).div_ceil(8);
            let h = (height * c.v).div_ceil(vmax).div_ceil(8);
            (w * h, vec![1])
        } else {
            let w = width.div_ceil(8 * hmax);
            let h = height.div_ceil(8 * vmax);
            (w * h, parts.iter().map(|p| p.2.h * p.2.v).collect())
        };
        let mut bits = Bits::new(b, pos);
        for m in 0..mcus {
            if self.restart > 0 && m > 0 && m % self.restart == 0 {
                bits.restart(((m / self.restart - 1) % 8) as u8)?;
            }
            for (part, &blocks) in parts.iter().zip(&per_mcu) {
                for _ in 0..blocks {
                    block(&mut bits, part.0, part.1)?;
                }
            }
        }
        bits.end()
    }
}

/// Where the next marker other than a restart starts, from `pos` in entropy-coded data.
fn skip_entropy_data(b: &[u8], mut pos: usize) -> usize {
    while pos + 1 < b.len() {
        if b[pos] == 0xFF && !matches!(b[pos + 1], 0x00 | 0xD0..=0xD7 | 0xFF) {
            return pos;
        }
        pos += 1;
    }
    b.len()
}

/// One 8×8 block: a DC difference, then AC run/size codes up to the end of block.
fn block(bits: &mut Bits, dc: &Table, ac: &Table) -> Result<(), String> {
    let s = bits.symbol(dc)?;
    if s > 15 {
        return Err(CORRUPT.into());
    }
    bits.skip(s)?;
    let mut k = 1;
    while k < 64 {
        let rs = bits.symbol(ac)?;
        let (run, size) = (usize::from(rs >> 4), rs & 15);
        if size == 0 {
            if run != 15 {
                break;
            }
            k += 16;
            continue;
        }
        k += run;
        if k > 63 {
            return Err(CORRUPT.into());
        }
        bits.skip(size)?;
        k += 1;
    }
    if k > 64 {
        return Err(CORRUPT.into());
    }
    Ok(())
}

const CORRUPT: &str = "corrupt JPEG (invalid data in its image)";

/// Bits of entropy-coded data, stuffed bytes removed, up to the next marker.
struct Bits<'a> {
    b: &'a [u8],
    pos: usize,
    acc: u64,
    n: u32,
    at_marker: bool,
}

impl<'a> Bits<'a> {
    fn new(b: &'a [u8], pos: usize) -> Self {
        Self {
            b,
            pos,
            acc: 0,
            n: 0,
            at_marker: false,
        }
    }

    fn fill(&mut self) {
        while self.n <= 56 && !self.at_marker {
            let Some(&byte) = self.b.get(self.pos) else {
                self.at_marker = true;
                break;
            };
            if byte == 0xFF {
                if self.b.get(self.pos + 1) != Some(&0) {
                    self.at_marker = true;
                    break;
                }
                self.pos += 1;
            }
            self.pos += 1;
            self.acc |= u64::from(byte) << (56 - self.n);
            self.n += 8;
        }
    }

    fn symbol(&mut self, t: &Table) -> Result<u8, String> {
        self.fill();
        // Past the data, ones: the padding, which no code is made of alone.
        let peek = ((self.acc | u64::MAX.checked_shr(self.n).unwrap_or(0)) >> 48) as usize;
        let (len, sym) = t.0[peek];
        if len == 0 {
            return Err(if self.n < 16 && self.at_marker {
                ENDS_EARLY.into()
            } else {
                CORRUPT.into()
            });
        }
        if u32::from(len) > self.n {
            return Err(ENDS_EARLY.into());
        }
        self.acc <<= len;
        self.n -= u32::from(len);
        Ok(sym)
    }

    fn skip(&mut self, count: u8) -> Result<(), String> {
        if count == 0 {
            return Ok(());
        }
        self.fill();
        if u32::from(count) > self.n {
            return Err(ENDS_EARLY.into());
        }
        self.acc <<= count;
        self.n -= u32::from(count);
        Ok(())
    }

    /// The data must end here: padding (under a byte), then a marker.
    fn end(&mut self) -> Result<usize, String> {
        self.fill();
        if !self.at_marker || self.n >= 8 {
            return Err("corrupt JPEG (extra bytes in its image data)".into());
        }
        Ok(self.pos)
    }

    /// Restart marker `index` must follow; the bits start afresh after it.
    fn restart(&mut self, index: u8) -> Result<(), String> {
        let at = self.end()?;
        let mut pos = at;
        while self.b.get(pos) == Some(&0xFF) {
            pos += 1;
        }
        match self.b.get(pos) {
            None => Err(ENDS_EARLY.into()),
            Some(&m) if m == 0xD0 + index => {
                *self = Bits::new(self.b, pos + 1);
                Ok(())
            }
            Some(_) => Err("corrupt JPEG (a restart marker is missing)".into()),
        }
    }
}
