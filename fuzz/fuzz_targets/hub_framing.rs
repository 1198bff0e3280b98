//! The hub socket's framing reader: any bytes from a peer through `split_frames`, the step
//! of `read_frames` that cuts length-prefixed frames out of its buffer. Checks that the frames
//! cut out, framed again, are exactly the bytes consumed; that what is left is less than one
//! frame; and that feeding the same bytes in two reads (cut where the input's first byte says,
//! the partial frame kept as `read_frames` keeps it) gives the same frames.
#![no_main]

use hubnat_hub::socket::{split_frames, Framed, MAX_WIRE_FRAME};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, PartialEq, Eq)]
enum Item {
    Frame(Vec<u8>),
    Oversized(usize),
}

/// Splits `reads` the way `read_frames` does: bytes appended to a buffer, whole frames cut
/// from its front, the rest kept.
fn run(reads: &[&[u8]], max: usize) -> (Vec<Item>, Result<usize, usize>) {
    let mut items = Vec::new();
    let mut buf: Vec<u8> = Vec::new();
    let mut consumed_total = 0;
    for read in reads {
        buf.extend_from_slice(read);
        let cut = split_frames(&buf, max, |item| {
            items.push(match item {
                Framed::Frame(f) => Item::Frame(f.to_vec()),
                Framed::Oversized(n) => Item::Oversized(n),
            })
        });
        match cut {
            Ok(n) => {
                consumed_total += n;
                buf.drain(..n);
            }
            Err(len) => return (items, Err(len)),
        }
    }
    (items, Ok(consumed_total))
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, bytes)) = data.split_first() else {
        return;
    };
    // The segment's largest frame: a small MTU or the reference one.
    let max = if first & 0x80 != 0 { 14 + 576 } else { 1514 };
    let mut items = Vec::new();
    let result = split_frames(bytes, max, |item| items.push(item));
    match result {
        Ok(consumed) => {
            assert!(consumed <= bytes.len());
            let mut again = Vec::new();
            for item in &items {
                match item {
                    Framed::Frame(f) => {
                        assert!(f.len() >= 14 && f.len() <= max);
                        again.extend_from_slice(&(f.len() as u32).to_be_bytes());
                        again.extend_from_slice(f);
                    }
                    Framed::Oversized(n) => {
                        assert!(*n > max && *n <= MAX_WIRE_FRAME);
                        let at = again.len();
                        again.extend_from_slice(&bytes[at..at + 4 + n]);
                    }
                }
            }
            assert_eq!(&again[..], &bytes[..consumed]);
            let rest = &bytes[consumed..];
            if rest.len() >= 4 {
                let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
                assert!(rest.len() < 4 + len, "a whole frame was left behind");
            }
        }
        Err(len) => assert!(!(14..=MAX_WIRE_FRAME).contains(&len)),
    }
    // In two reads.
    let whole: Vec<Item> = items
        .iter()
        .map(|i| match i {
            Framed::Frame(f) => Item::Frame(f.to_vec()),
            Framed::Oversized(n) => Item::Oversized(*n),
        })
        .collect();
    let cut = usize::from(first & 0x7f) * bytes.len() / 127;
    let (a, b) = bytes.split_at(cut);
    let (split_items, split_result) = run(&[a, b], max);
    assert_eq!(split_items, whole);
    assert_eq!(split_result, result);
});
