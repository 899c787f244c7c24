//! Bounded fuzzing of the broker protocol's decoder and of a framed
//! connection reading the same bytes.
//!
//! Inputs: random byte strings (0..64 KiB), valid frames of random messages
//! then mutated (bit flips, truncation, extension, length, count, version and
//! kind tweaks), valid headers over random payloads, and headers announcing
//! huge lengths. For each: `decode` must not panic, an accepted frame must
//! encode back to exactly the bytes it took, `Incomplete` must mean the input
//! is a strict prefix of the announced frame, and nothing is consumed beyond
//! the input. A share of the inputs is also written into a socket pair and
//! read back with `Conn::recv`, which must yield exactly what decoding the
//! stream frame by frame yields, and never hang.
//!
//! Runs for `TWINPAGE_FUZZ_SECS` seconds (default 10) or
//! `TWINPAGE_FUZZ_CASES` cases (default 50 million), whichever comes first.
//! The seed is printed; `TWINPAGE_FUZZ_SEED` replays one.

use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use twinpage::broker::conn::{Conn, ConnError};
use twinpage::broker::proto::{
    decode, encode, frame_len, validate, Candidate, FillPage, Msg, Order, OrderKind, ProtoError, HEADER, MAX_DOMAIN, MAX_FILL, MAX_ITEMS,
    MAX_PAYLOAD, MAX_REASON, PAGE, VERSION,
};
use twinpage::sys::scm;

const KINDS: [u16; 14] = [1, 2, 3, 4, 5, 6, 7, 8, 16, 17, 18, 19, 20, 21];

fn env_num(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

/// A list length: mostly small, sometimes hundreds, rarely the maximum or
/// near it.
fn len(rng: &mut StdRng, max: usize) -> usize {
    match rng.gen_range(0..1000) {
        0..=599 => rng.gen_range(0..=4.min(max)),
        600..=949 => rng.gen_range(0..=64.min(max)),
        950..=997 => rng.gen_range(0..=1024.min(max)),
        _ => max - rng.gen_range(0..=2.min(max)),
    }
}

fn domain(rng: &mut StdRng) -> String {
    const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._:-";
    let n = if rng.gen_bool(0.05) { MAX_DOMAIN } else { rng.gen_range(1..=24) };
    (0..n).map(|_| CHARS[rng.gen_range(0..CHARS.len())] as char).collect()
}

/// A random valid message, and where its count/length fields are in its
/// frame (offset, width in bytes).
fn message(rng: &mut StdRng) -> (Msg, Vec<(usize, usize)>) {
    let p = HEADER;
    match rng.gen_range(0..12) {
        0 => {
            let d = if rng.gen_bool(0.5) { Some(domain(rng)) } else { None };
            (Msg::Hello { pid: rng.gen(), domain: d }, vec![(p + 4, 1)])
        }
        1 => {
            let n = len(rng, MAX_ITEMS);
            let items = (0..n).map(|_| Candidate { token: rng.gen(), digest: rng.gen(), stable: rng.gen() }).collect();
            (Msg::Scan { items }, vec![(p, 4)])
        }
        2 => {
            // Pages are big: keep the maximum rare.
            let n = if rng.gen_ratio(1, 4000) { MAX_FILL } else { rng.gen_range(0..=3) };
            let pages = (0..n)
                .map(|_| {
                    let mut bytes = Box::new([0u8; PAGE]);
                    if rng.gen_bool(0.5) {
                        rng.fill_bytes(&mut bytes[..]);
                    }
                    FillPage { store: rng.gen(), digest: rng.gen(), bytes }
                })
                .collect();
            (Msg::Fill { pages }, vec![(p, 4)])
        }
        3 => {
            let list = |rng: &mut StdRng| (0..len(rng, MAX_ITEMS)).map(|_| rng.gen()).collect::<Vec<u32>>();
            let (committed, cancelled, released, retired) = (list(rng), list(rng), list(rng), list(rng));
            let o2 = p + 4 + 4 * committed.len();
            let o3 = o2 + 4 + 4 * cancelled.len();
            let o4 = o3 + 4 + 4 * released.len();
            (Msg::Report { committed, cancelled, released, retired }, vec![(p, 4), (o2, 4), (o3, 4), (o4, 4)])
        }
        4 => (Msg::FullScan, vec![]),
        5 => (Msg::Welcome { agent_id: rng.gen(), agents: rng.gen() }, vec![]),
        6 => {
            let n = len(rng, MAX_ITEMS);
            let orders = (0..n)
                .map(|_| Order { token: rng.gen(), store: rng.gen(), kind: if rng.gen() { OrderKind::Join } else { OrderKind::Upload } })
                .collect();
            (Msg::Orders { agents: rng.gen(), orders }, vec![(p + 4, 4)])
        }
        7 => {
            let n = len(rng, MAX_ITEMS);
            (Msg::Filled { results: (0..n).map(|_| (rng.gen(), rng.gen())).collect() }, vec![(p, 4)])
        }
        8 => {
            let store = (0..len(rng, MAX_ITEMS)).map(|_| rng.gen()).collect();
            (Msg::Holding { store, done: rng.gen() }, vec![(p + 1, 4)])
        }
        9 => (if rng.gen() { Msg::Resume { agent_id: rng.gen() } } else { Msg::Resumed { ok: rng.gen() } }, vec![]),
        10 => (if rng.gen() { Msg::AskTotals } else { Msg::Totals { pages_shared: rng.gen(), pages_sharing: rng.gen() } }, vec![]),
        _ => {
            let n = len(rng, MAX_REASON);
            let reason: String = if rng.gen_bool(0.2) {
                // Multi-byte characters, cut to fit.
                let mut s = String::new();
                while s.len() + 3 <= n {
                    s.push('é');
                    s.push('x');
                }
                s
            } else {
                (0..n).map(|_| rng.gen_range(b' '..=b'~') as char).collect()
            };
            (Msg::Refused { reason }, vec![(p, 2)])
        }
    }
}

fn frame(msg: &Msg) -> Vec<u8> {
    let mut out = Vec::new();
    encode(msg, &mut out);
    out
}

fn put(buf: &mut [u8], off: usize, width: usize, v: u64) {
    if off + width <= buf.len() {
        buf[off..off + width].copy_from_slice(&v.to_le_bytes()[..width]);
    }
}

fn get(buf: &[u8], off: usize, width: usize) -> u64 {
    let mut b = [0u8; 8];
    if off + width <= buf.len() {
        b[..width].copy_from_slice(&buf[off..off + width]);
    }
    u64::from_le_bytes(b)
}

/// A new value for a numeric field of `width` bytes that held `old`.
fn tweak(rng: &mut StdRng, old: u64, width: usize, limits: &[u64]) -> u64 {
    let mask = if width == 8 { u64::MAX } else { (1u64 << (8 * width)) - 1 };
    let v = match rng.gen_range(0..6) {
        0 => old.wrapping_add(rng.gen_range(1..=8)),
        1 => old.wrapping_sub(rng.gen_range(1..=8)),
        2 => 0,
        3 => mask,
        4 => limits[rng.gen_range(0..limits.len())],
        _ => rng.gen(),
    };
    v & mask
}

/// One to three mutations of a valid frame.
fn mutate(rng: &mut StdRng, buf: &mut Vec<u8>, fields: &[(usize, usize)]) {
    for _ in 0..rng.gen_range(1..=3) {
        match rng.gen_range(0..8) {
            0 if !buf.is_empty() => {
                for _ in 0..rng.gen_range(1..=8) {
                    let bit = rng.gen_range(0..buf.len() * 8);
                    buf[bit / 8] ^= 1 << (bit % 8);
                }
            }
            1 if !buf.is_empty() => {
                let cut = rng.gen_range(0..buf.len());
                buf.truncate(cut);
            }
            2 => {
                if rng.gen() {
                    let n = rng.gen_range(1..=64);
                    buf.extend((0..n).map(|_| rng.gen::<u8>()));
                } else {
                    let (m, _) = message(rng);
                    encode(&m, buf);
                }
            }
            3 => {
                let old = get(buf, 0, 4);
                let limits = [MAX_PAYLOAD as u64, MAX_PAYLOAD as u64 + 1, buf.len() as u64, old + 1];
                let v = tweak(rng, old, 4, &limits);
                put(buf, 0, 4, v);
            }
            4 if !fields.is_empty() => {
                let (off, width) = fields[rng.gen_range(0..fields.len())];
                let old = get(buf, off, width);
                let limits = [MAX_ITEMS as u64, MAX_ITEMS as u64 + 1, MAX_FILL as u64 + 1, MAX_REASON as u64 + 1, MAX_DOMAIN as u64];
                let v = tweak(rng, old, width, &limits);
                put(buf, off, width, v);
                // Sometimes keep the frame length consistent with the count.
                if rng.gen() {
                    let delta = (v as i64 - old as i64).clamp(-1 << 20, 1 << 20);
                    let len = get(buf, 0, 4) as i64 + delta * rng.gen_range(1..=17);
                    put(buf, 0, 4, len.clamp(0, u32::MAX as i64) as u64);
                }
            }
            5 => {
                let v = tweak(rng, get(buf, 4, 2), 2, &[VERSION as u64, VERSION as u64 + 1]);
                put(buf, 4, 2, v);
            }
            6 => {
                let k = if rng.gen() { KINDS[rng.gen_range(0..KINDS.len())] as u64 } else { rng.gen::<u16>() as u64 };
                put(buf, 6, 2, k);
            }
            _ if !buf.is_empty() => {
                // Overwrite a byte with a boundary value (booleans, order
                // kinds, length bytes).
                let at = rng.gen_range(0..buf.len());
                buf[at] = [0, 1, 2, 3, 0x7f, 0x80, 0xff][rng.gen_range(0..7)];
            }
            _ => {}
        }
    }
}

fn header(len: u32, version: u16, kind: u16) -> Vec<u8> {
    let mut h = Vec::with_capacity(HEADER);
    h.extend_from_slice(&len.to_le_bytes());
    h.extend_from_slice(&version.to_le_bytes());
    h.extend_from_slice(&kind.to_le_bytes());
    h
}

#[derive(Clone, Copy, Debug)]
enum Class {
    Random,
    Mutated,
    Huge,
    RandomPayload,
    Stream,
}

/// One input of the given class.
fn input(rng: &mut StdRng, class: Class) -> Vec<u8> {
    match class {
        Class::Random => {
            let n = match rng.gen_range(0..10) {
                0..=6 => rng.gen_range(0..=64),
                7 | 8 => rng.gen_range(0..=4096),
                _ => rng.gen_range(0..=64 << 10),
            };
            let mut v = vec![0u8; n];
            rng.fill_bytes(&mut v);
            // Random bytes rarely pass the version check: often make them.
            if n >= HEADER && rng.gen_bool(0.5) {
                put(&mut v, 4, 2, VERSION as u64);
                if rng.gen() {
                    put(&mut v, 6, 2, KINDS[rng.gen_range(0..KINDS.len())] as u64);
                }
            }
            v
        }
        Class::Mutated => {
            let (m, fields) = message(rng);
            let mut buf = frame(&m);
            mutate(rng, &mut buf, &fields);
            buf
        }
        Class::Huge => {
            let len = match rng.gen_range(0..4) {
                0 => u32::MAX - rng.gen_range(0..16),
                1 => MAX_PAYLOAD as u32 + rng.gen_range(0..=16),
                2 => rng.gen_range(MAX_PAYLOAD as u32 / 2..=u32::MAX),
                _ => 1 << rng.gen_range(12..32),
            };
            let version = if rng.gen_bool(0.9) { VERSION } else { rng.gen() };
            let mut h = header(len, version, KINDS[rng.gen_range(0..KINDS.len())]);
            let extra = rng.gen_range(0..=64);
            h.extend((0..extra).map(|_| rng.gen::<u8>()));
            h
        }
        Class::RandomPayload => {
            let kind = KINDS[rng.gen_range(0..KINDS.len())];
            let n = match rng.gen_range(0..4) {
                0 => rng.gen_range(0..=16),
                1 => rng.gen_range(0..=64),
                2 => rng.gen_range(0..=1100),
                _ => rng.gen_range(0..=8300),
            };
            let mut f = header(n as u32, VERSION, kind);
            let start = f.len();
            f.resize(start + n, 0);
            match rng.gen_range(0..3) {
                0 => rng.fill_bytes(&mut f[start..]),
                // Small values: booleans and kinds often valid, counts small.
                1 => f[start..].iter_mut().for_each(|b| *b = rng.gen_range(0..3)),
                _ => {}
            }
            // A plausible count at the front.
            if n >= 4 && rng.gen() {
                let item = [17usize, 4108, 4, 13, 5][rng.gen_range(0..5)];
                put(&mut f, start, 4, ((n - 4) / item) as u64);
            }
            f
        }
        Class::Stream => {
            // Several valid frames, the last one maybe mutated.
            let mut buf = Vec::new();
            for _ in 0..rng.gen_range(1..=4) {
                let (m, _) = message(rng);
                encode(&m, &mut buf);
            }
            if rng.gen() {
                let (m, fields) = message(rng);
                let mut last = frame(&m);
                mutate(rng, &mut last, &fields);
                buf.extend_from_slice(&last);
            }
            buf
        }
    }
}

fn hex_prefix(buf: &[u8]) -> String {
    buf.iter().take(64).map(|b| format!("{b:02x}")).collect()
}

/// Checks the decoder's contract on one input.
fn check_decode(buf: &[u8], ctx: &str) -> Result<(Msg, usize), ProtoError> {
    let res = catch_unwind(AssertUnwindSafe(|| decode(buf)))
        .unwrap_or_else(|_| panic!("decode panicked ({ctx}); input {} bytes: {}", buf.len(), hex_prefix(buf)));
    match &res {
        Ok((msg, used)) => {
            assert!(*used <= buf.len(), "consumed {used} of {} ({ctx})", buf.len());
            assert_eq!(frame_len(buf), Ok(*used), "frame_len disagrees ({ctx})");
            let again = frame(msg);
            assert!(again == buf[..*used], "not canonical ({ctx}): {msg:?} from {}", hex_prefix(buf));
            assert_eq!(validate(msg), Ok(()), "decoded message fails validation ({ctx})");
        }
        Err(ProtoError::Incomplete(n)) => {
            assert!(*n > 0, "Incomplete(0) ({ctx})");
            if buf.len() < HEADER {
                assert_eq!(*n, HEADER - buf.len(), "short header ({ctx})");
            } else {
                let total = frame_len(buf).unwrap_or_else(|e| panic!("Incomplete with a bad header {e:?} ({ctx})"));
                assert!(buf.len() < total && buf.len() + n == total, "Incomplete({n}) for {} of {total} ({ctx})", buf.len());
            }
        }
        Err(e) => {
            assert!(buf.len() >= HEADER, "{e:?} before the header is complete ({ctx})");
            if let Err(h) = frame_len(buf) {
                assert_eq!(&h, e, "header error differs ({ctx})");
            }
        }
    }
    res
}

/// What a reader of `buf` as a stream must see: the messages decoded frame
/// by frame, then the end (Err(None): closed) or the protocol error.
fn expected_stream(buf: &[u8]) -> (Vec<Msg>, Option<ProtoError>) {
    let mut msgs = Vec::new();
    let mut off = 0;
    loop {
        if off == buf.len() {
            return (msgs, None);
        }
        match decode(&buf[off..]) {
            Ok((m, used)) => {
                msgs.push(m);
                off += used;
            }
            Err(ProtoError::Incomplete(_)) => return (msgs, None),
            Err(e) => return (msgs, Some(e)),
        }
    }
}

/// Writes inputs into sockets on its own thread, then closes them.
struct Writer {
    tx: Option<mpsc::Sender<(UnixStream, Vec<u8>)>>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    fn new() -> Self {
        let (tx, rx) = mpsc::channel::<(UnixStream, Vec<u8>)>();
        let handle = std::thread::spawn(move || {
            for (sock, data) in rx {
                let mut off = 0;
                // Split the writes at random-ish points so frames arrive in
                // pieces (the length itself decides, to stay reproducible).
                let step = 1 + data.len() % 4093;
                while off < data.len() {
                    let end = (off + step).min(data.len());
                    match scm::send_with_fd(sock.as_fd(), &data[off..end], None) {
                        Ok(n) => off += n,
                        // The reader stopped early (protocol error): fine.
                        Err(_) => break,
                    }
                }
                drop(sock);
            }
        });
        Writer { tx: Some(tx), handle: Some(handle) }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Feeds `buf` to a `Conn` and compares with decoding it frame by frame.
fn check_conn(writer: &Writer, buf: &[u8], ctx: &str) {
    let (w, r) = UnixStream::pair().unwrap();
    let mut conn = Conn::new(r);
    conn.set_timeout(Some(Duration::from_secs(20))).unwrap();
    writer.tx.as_ref().unwrap().send((w, buf.to_vec())).unwrap();
    let (want, end) = expected_stream(buf);
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        let mut got = Vec::new();
        loop {
            match conn.recv() {
                Ok((m, fd)) => {
                    assert!(fd.is_none(), "a descriptor from nowhere ({ctx})");
                    got.push(m);
                    assert!(got.len() <= want.len(), "more messages than frames ({ctx})");
                }
                Err(e) => return (got, e),
            }
        }
    }));
    let (got, err) = outcome.unwrap_or_else(|_| panic!("Conn::recv panicked ({ctx}); input {}", hex_prefix(buf)));
    assert!(got == want, "Conn got other messages than decode ({ctx})");
    match (err, end) {
        (ConnError::Closed, None) => {}
        (ConnError::Proto(e), Some(w)) => assert_eq!(e, w, "({ctx})"),
        (e, w) => panic!("Conn ended with {e:?}, decode with {w:?} ({ctx}); input {}", hex_prefix(buf)),
    }
}

#[test]
fn fuzz_decoder_and_conn() {
    let secs = env_num("TWINPAGE_FUZZ_SECS").unwrap_or(10);
    let max_cases = env_num("TWINPAGE_FUZZ_CASES").unwrap_or(50_000_000);
    let seed = env_num("TWINPAGE_FUZZ_SEED").unwrap_or_else(|| {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        t.as_nanos() as u64 ^ (std::process::id() as u64) << 32
    });
    println!("proto_fuzz: seed {seed} (TWINPAGE_FUZZ_SEED={seed} replays), {secs} s, at most {max_cases} cases");
    let mut rng = StdRng::seed_from_u64(seed);
    let writer = Writer::new();
    let deadline = Instant::now() + Duration::from_secs(secs);
    let start = Instant::now();
    let classes = [Class::Random, Class::Mutated, Class::Huge, Class::RandomPayload, Class::Stream];
    let mut per_class = [0u64; 5];
    let (mut cases, mut conn_cases, mut accepted, mut incomplete) = (0u64, 0u64, 0u64, 0u64);
    let mut errors: std::collections::BTreeMap<String, u64> = Default::default();
    while cases < max_cases && (cases % 64 != 0 || Instant::now() < deadline) {
        let ci = match rng.gen_range(0..100) {
            0..=24 => 0,
            25..=64 => 1,
            65..=69 => 2,
            70..=89 => 3,
            _ => 4,
        };
        let buf = input(&mut rng, classes[ci]);
        let ctx = format!("seed {seed} case {cases} class {:?}", classes[ci]);
        match check_decode(&buf, &ctx) {
            Ok(_) => accepted += 1,
            Err(ProtoError::Incomplete(_)) => incomplete += 1,
            Err(e) => {
                let key = match e {
                    ProtoError::Malformed(why) => format!("Malformed({why})"),
                    ProtoError::Version(_) => "Version".into(),
                    ProtoError::Kind(_) => "Kind".into(),
                    ProtoError::TooLarge(_) => "TooLarge".into(),
                    ProtoError::Incomplete(_) => unreachable!(),
                };
                *errors.entry(key).or_default() += 1;
            }
        }
        // A random prefix of a frame or stream decodes consistently too.
        if matches!(classes[ci], Class::Stream | Class::Mutated) && !buf.is_empty() {
            let cut = rng.gen_range(0..buf.len());
            let _ = check_decode(&buf[..cut], &format!("{ctx} prefix {cut}"));
        }
        // A share of the inputs (all stream ones) through a socket too.
        if matches!(classes[ci], Class::Stream) || rng.gen_ratio(1, 8) {
            check_conn(&writer, &buf, &ctx);
            conn_cases += 1;
        }
        per_class[ci] += 1;
        cases += 1;
    }
    drop(writer);
    let elapsed = start.elapsed().as_secs_f64();
    println!(
        "proto_fuzz: {cases} cases in {elapsed:.1} s ({:.0}/s; {conn_cases} also through a Conn): \
         random {}, mutated {}, huge {}, random payload {}, streams {}",
        cases as f64 / elapsed,
        per_class[0],
        per_class[1],
        per_class[2],
        per_class[3],
        per_class[4],
    );
    println!("proto_fuzz: accepted {accepted}, incomplete {incomplete}, refused: {errors:?}");
    assert!(cases > 0);
    assert!(accepted > 0, "no input decoded: the generator is broken");
    std::io::stdout().flush().unwrap();
}

/// The limits the fuzzer relies on are the documented ones.
#[test]
fn limits() {
    assert_eq!(MAX_PAYLOAD, 8 << 20);
    assert_eq!((VERSION, PAGE, MAX_ITEMS, MAX_FILL, MAX_DOMAIN, MAX_REASON), (3, 4096, 65536, 1024, 255, 1024));
    assert_eq!(frame_len(&header(u32::MAX, VERSION, 3)), Err(ProtoError::TooLarge(u32::MAX as usize)));
}
