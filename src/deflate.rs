//! gzip bodies assembled from pieces compressed ahead of time.
//!
//! A gzip member is a 10-byte header, a DEFLATE stream and a trailer (CRC-32 and length of
//! the uncompressed data, RFC 1952). A DEFLATE stream is a sequence of blocks, and a block
//! that ends in a *sync flush* ends on a byte boundary and leaves the stream open
//! (RFC 1951 §3.2.3: the flush appends an empty stored block). So pieces of text each
//! compressed on its own — a fresh compressor, no back-references outside the piece, ended
//! by a sync flush — can be joined in any order into one stream: [`Body`] writes the
//! header, appends the ready pieces, closes the stream with a final block and writes the
//! trailer, whose CRC it computes over the uncompressed pieces while copying (a few tens
//! of microseconds for a few hundred kilobytes). The CPU-heavy part, compressing, happens
//! once per piece, when the snapshot it comes from is stored.

use std::sync::Mutex;

use flate2::{Compress, Compression, FlushCompress};

/// The compression level of pieces. Pieces are compressed when a snapshot is stored (in
/// the poller, once per poll), not per scrape. Chosen on a real 5,000-statement scrape of
/// 302 KB (`PGVIGIL_BENCH_BODY=body.txt cargo bench --bench encode -- gzip_level`): the
/// smallest output that costs no more CPU than level 2 of the previous backend
/// (miniz_oxide: 2.12 ms, 33.3 KB; zlib-rs level 4: 2.00 ms, 31.3 KB; level 6 would be
/// 3.2 ms for 29.8 KB).
pub const LEVEL: u32 = 4;

/// `data` compressed as raw DEFLATE blocks ending in a sync flush: a piece [`Body`] can
/// place anywhere in a stream. Empty for empty `data`.
pub fn piece(data: &[u8]) -> Vec<u8> {
    piece_at(data, LEVEL)
}

/// [`piece`] at compression level `level` (0–9).
pub fn piece_at(data: &[u8], level: u32) -> Vec<u8> {
    if data.is_empty() {
        return Vec::new();
    }
    let level = level.min(9);
    // A compressor's state is a few hundred kilobytes, and building one costs more than
    // compressing a small piece: they are kept in a pool shared by all threads, reset per
    // piece. The pool holds as many as were ever in use at once (pieces are compressed
    // by the pollers and by scrapes), usually one or two, however many threads there are.
    static POOL: Mutex<Vec<(u32, Compress)>> = Mutex::new(Vec::new());
    let taken = {
        let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
        let at = pool.iter().position(|(l, _)| *l == level);
        at.map(|i| pool.swap_remove(i).1)
    };
    let mut c = match taken {
        Some(mut c) => {
            c.reset();
            c
        }
        None => Compress::new(Compression::new(level), false),
    };
    let out = compress_sync(&mut c, data);
    let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
    if pool.len() < POOL_MAX {
        pool.push((level, c));
    }
    out
}

/// At most this many idle compressors are kept.
const POOL_MAX: usize = 4;

/// `data` through `c` (fresh or reset), ended by a sync flush.
fn compress_sync(c: &mut Compress, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() / 4 + 64);
    loop {
        let consumed = c.total_in() as usize;
        if out.capacity() - out.len() < 64 {
            out.reserve(out.capacity().max(1024));
        }
        // Compressing into a Vec with room left only fails on a broken stream state,
        // which a fresh reset rules out; stop rather than loop if it ever happens.
        if c.compress_vec(&data[consumed..], &mut out, FlushCompress::Sync)
            .is_err()
        {
            break;
        }
        // The flush is complete once all input is in and the output was not full.
        if c.total_in() as usize == data.len() && out.capacity() - out.len() >= 64 {
            break;
        }
    }
    // Pieces are kept as long as their snapshot: only what they hold, not the room the
    // output was given (at least a kilobyte, for pieces often a tenth of that).
    out.shrink_to_fit();
    out
}

/// A gzip body under construction: one member, pieces appended in order.
pub struct Body {
    out: Vec<u8>,
    crc: crc32fast::Hasher,
    len: u64,
}

impl Body {
    pub fn with_capacity(compressed: usize) -> Body {
        let mut out = Vec::with_capacity(compressed + 32);
        // ID1 ID2, CM = deflate, no flags, no mtime, no extra flags, OS unknown.
        out.extend_from_slice(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff]);
        Body {
            out,
            crc: crc32fast::Hasher::new(),
            len: 0,
        }
    }

    /// Appends `raw`, given its [`piece`] (compressed from exactly these bytes).
    pub fn push(&mut self, raw: &[u8], piece: &[u8]) {
        self.crc.update(raw);
        self.len += raw.len() as u64;
        self.out.extend_from_slice(piece);
    }

    /// Ends the stream with `tail` (a few bytes, stored uncompressed in the final block)
    /// and writes the trailer.
    pub fn finish(mut self, tail: &[u8]) -> Vec<u8> {
        let n = u16::try_from(tail.len()).expect("a short tail");
        self.crc.update(tail);
        self.len += tail.len() as u64;
        // A final stored block (BFINAL = 1, BTYPE = 00): LEN, NLEN, the bytes.
        self.out.push(0x01);
        self.out.extend_from_slice(&n.to_le_bytes());
        self.out.extend_from_slice(&(!n).to_le_bytes());
        self.out.extend_from_slice(tail);
        self.out
            .extend_from_slice(&self.crc.finalize().to_le_bytes());
        // ISIZE is the length modulo 2^32.
        self.out
            .extend_from_slice(&((self.len & 0xffff_ffff) as u32).to_le_bytes());
        self.out
    }
}

/// A gzip body decompressed (tests of the modules that make them).
#[cfg(test)]
pub(crate) fn gunzip(body: &[u8]) -> Vec<u8> {
    use std::io::Read as _;
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(body)
        .read_to_end(&mut out)
        .expect("a valid gzip member");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_piece_holds_no_more_memory_than_its_bytes() {
        // Pieces live as long as their snapshot, thousands of them with many targets.
        for data in [&b"pg_up{target=\"a\"} 1\n"[..], &[b'x'; 100_000][..]] {
            let p = piece(data);
            assert!(!p.is_empty());
            assert_eq!(p.capacity(), p.len());
        }
    }

    #[test]
    fn pieces_join_in_any_order_into_one_valid_member() {
        let texts: Vec<Vec<u8>> = (0..5)
            .map(|i| {
                (0..200 * i + 1)
                    .map(|j| format!("pg_metric{{queryid=\"{}\"}} {j}\n", j * 7919 + i))
                    .collect::<String>()
                    .into_bytes()
            })
            .collect();
        let pieces: Vec<Vec<u8>> = texts.iter().map(|t| piece(t)).collect();
        for order in [[0, 1, 2, 3, 4], [4, 2, 0, 3, 1], [3, 3, 1, 1, 0]] {
            let mut body = Body::with_capacity(0);
            let mut expected = Vec::new();
            for i in order {
                body.push(&texts[i], &pieces[i]);
                expected.extend_from_slice(&texts[i]);
            }
            expected.extend_from_slice(b"# EOF\n");
            let gz = body.finish(b"# EOF\n");
            assert_eq!(gunzip(&gz), expected, "order {order:?}");
        }
        // Repetitive text compresses well even in pieces.
        let big = &texts[4];
        assert!(
            pieces[4].len() * 4 < big.len(),
            "{} of {}",
            pieces[4].len(),
            big.len()
        );
    }

    #[test]
    fn an_empty_body_and_empty_pieces_are_valid() {
        assert!(piece(b"").is_empty());
        let mut body = Body::with_capacity(0);
        body.push(b"", &piece(b""));
        assert_eq!(gunzip(&body.finish(b"")), b"");
    }

    #[test]
    fn the_system_gzip_reads_a_joined_body() {
        let a = b"# HELP a A.\n# TYPE a gauge\na 1\n".repeat(50);
        let b = b"b{x=\"y\"} 2.5\n".repeat(70);
        let mut body = Body::with_capacity(0);
        body.push(&a, &piece(&a));
        body.push(&b, &piece(&b));
        let gz = body.finish(b"");
        let dir = std::env::temp_dir().join(format!("pgvigil-deflate-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("body.gz");
        std::fs::write(&path, &gz).unwrap();
        let out = std::process::Command::new("gzip")
            .arg("-dc")
            .arg(&path)
            .output()
            .expect("gzip is installed");
        std::fs::remove_dir_all(&dir).ok();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.stdout, [a, b].concat());
    }
}
