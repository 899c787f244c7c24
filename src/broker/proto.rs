//! The wire protocol between agents (preloaded into guests) and the broker
//! (`twinpaged`): versioned, length-prefixed frames. Pure encoding and
//! decoding, no I/O (see [`conn`](super::conn) for the socket side).
//!
//! A frame is an 8-byte header, then the payload:
//!
//! | bytes | field                          |
//! |-------|--------------------------------|
//! | 0..4  | `u32` payload length           |
//! | 4..6  | `u16` version = [`VERSION`]    |
//! | 6..8  | `u16` kind (see [`Msg`])       |
//!
//! All integers are little-endian. Booleans are one byte, 0 or 1.
//!
//! The decoder treats its input as hostile: it never panics, never allocates
//! more than the payload length it has in hand justifies (every count is
//! checked against the bytes left before anything is allocated), and accepts
//! exactly one encoding of each message, so that a decoded message encodes
//! back to the very bytes it came from. A header is checked on its own
//! ([`frame_len`]) so that a reader can refuse an oversized frame before
//! waiting for its bytes.

/// Protocol version; a frame of any other version is refused. 2 added
/// `AskTotals`/`Totals`, 3 `Report`'s `retired`: an agent and a daemon of
/// different versions do not connect at all, rather than part at the first
/// question.
pub const VERSION: u16 = 3;
/// Bytes of a frame header.
pub const HEADER: usize = 8;
/// Largest payload of any frame.
pub const MAX_PAYLOAD: usize = 8 << 20;
/// Bytes of a page.
pub const PAGE: usize = 4096;
/// Most candidates, orders, results, or entries of each report list, in one
/// message.
pub const MAX_ITEMS: usize = 65536;
/// Most pages in one `Fill`.
pub const MAX_FILL: usize = 1024;
/// Longest domain name, in bytes. Names are non-empty and made of
/// `[A-Za-z0-9._:-]` only.
pub const MAX_DOMAIN: usize = 255;
/// Longest `Refused` reason, in bytes (UTF-8).
pub const MAX_REASON: usize = 1024;

// Message kinds.
const K_HELLO: u16 = 1;
const K_SCAN: u16 = 2;
const K_FILL: u16 = 3;
const K_REPORT: u16 = 4;
const K_FULL_SCAN: u16 = 5;
const K_RESUME: u16 = 6;
const K_HOLDING: u16 = 7;
const K_ASK_TOTALS: u16 = 8;
const K_WELCOME: u16 = 16;
const K_ORDERS: u16 = 17;
const K_FILLED: u16 = 18;
const K_REFUSED: u16 = 19;
const K_RESUMED: u16 = 20;
const K_TOTALS: u16 = 21;

// Wire sizes of list items.
const CANDIDATE_BYTES: usize = 8 + 8 + 1;
const ORDER_BYTES: usize = 8 + 4 + 1;
const FILL_PAGE_BYTES: usize = 4 + 8 + PAGE;
const RESULT_BYTES: usize = 4 + 1;

/// Largest payload a frame of `kind` can have, or `None` for an unknown kind.
/// A header announcing more is refused at once (`TooLarge`).
const fn max_payload(kind: u16) -> Option<usize> {
    Some(match kind {
        K_HELLO => 4 + 1 + MAX_DOMAIN,
        K_SCAN => 4 + MAX_ITEMS * CANDIDATE_BYTES,
        K_FILL => 4 + MAX_FILL * FILL_PAGE_BYTES,
        K_REPORT => 4 * (4 + MAX_ITEMS * 4),
        K_FULL_SCAN => 0,
        K_WELCOME => 8,
        K_ORDERS => 8 + MAX_ITEMS * ORDER_BYTES,
        K_FILLED => 4 + MAX_ITEMS * RESULT_BYTES,
        K_REFUSED => 2 + MAX_REASON,
        K_RESUME => 4,
        K_HOLDING => 1 + 4 + MAX_ITEMS * 4,
        K_RESUMED => 1,
        K_ASK_TOTALS => 0,
        K_TOTALS => 16,
        _ => return None,
    })
}

// Every kind's largest frame fits the global limit.
const _: () = {
    let kinds = [
        K_HELLO,
        K_SCAN,
        K_FILL,
        K_REPORT,
        K_FULL_SCAN,
        K_RESUME,
        K_HOLDING,
        K_ASK_TOTALS,
        K_WELCOME,
        K_ORDERS,
        K_FILLED,
        K_REFUSED,
        K_RESUMED,
        K_TOTALS,
    ];
    let mut i = 0;
    while i < kinds.len() {
        match max_payload(kinds[i]) {
            Some(n) => assert!(n <= MAX_PAYLOAD),
            None => panic!("kind without a size limit"),
        }
        i += 1;
    }
};

/// A page an agent offers for merging: `token` is the agent's own handle for
/// it (one page, one token, for as long as it is mapped: the broker takes
/// two tokens for two pages), `digest` a hash of its content, `stable`
/// whether it went unchanged since the last scan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    pub token: u64,
    pub digest: u64,
    pub stable: bool,
}

/// What the agent is to do with a candidate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderKind {
    /// Map store page `store` over the candidate (after comparing bytes).
    Join = 1,
    /// Send the candidate's content for store page `store` (`Fill`).
    Upload = 2,
}

/// A merge order for the candidate `token`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Order {
    pub token: u64,
    pub store: u32,
    pub kind: OrderKind,
}

/// Content for store page `store`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FillPage {
    pub store: u32,
    pub digest: u64,
    pub bytes: Box<[u8; PAGE]>,
}

/// One message. Kinds 1–8 go from agent to broker, 16–21 back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg {
    /// Kind 1: the first message of an agent; `domain` names the sharing
    /// domain to join (none: the uid's default one). Wire: `u32` pid, `u8`
    /// name length (0 = none), name bytes.
    Hello { pid: u32, domain: Option<String> },
    /// Kind 2: a batch of candidates. Wire: `u32` count, items (`u64` token,
    /// `u64` digest, `u8` stable).
    Scan { items: Vec<Candidate> },
    /// Kind 3: uploads answering `Upload` orders. Wire: `u32` count, pages
    /// (`u32` store, `u64` digest, 4096 bytes).
    Fill { pages: Vec<FillPage> },
    /// Kind 4: store pages whose orders the agent carried out, cancelled,
    /// store pages it stopped using, and store pages it stopped using
    /// because the program wrote its page in place over them (the broker
    /// never hands those out again). Wire: four times `u32` count, `u32`s.
    Report { committed: Vec<u32>, cancelled: Vec<u32>, released: Vec<u32>, retired: Vec<u32> },
    /// Kind 5: the agent finished a full pass over its memory. Empty payload.
    FullScan,
    /// Kind 6: right after `Welcome`: this process was agent `agent_id`
    /// until its connection broke, and still maps what it merged then; the
    /// broker hands that agent's references over to the new one when it
    /// has them parked for this process. Wire: `u32` agent id.
    Resume { agent_id: u32 },
    /// Kind 7: after `Resumed { ok: true }`, what the agent still maps of
    /// its parked self's store pages: one entry per page it maps, in as many
    /// messages as it takes, the last with `done`. The broker keeps exactly
    /// those references (never more than the parked self held) and drops
    /// the rest when `done` arrives: orders carried out but never reported,
    /// reports lost with the link. Wire: `u8` done, `u32` count, `u32`s.
    Holding { store: Vec<u32>, done: bool },
    /// Kind 8: asks for the daemon's counts (`Totals`), for a program that
    /// reads `/sys/kernel/mm/ksm` in-process. Empty payload.
    AskTotals,
    /// Kind 16: the agent is in; the read-only store fd travels with this
    /// message (`SCM_RIGHTS`). Wire: `u32` agent id, `u32` agents.
    Welcome { agent_id: u32, agents: u32 },
    /// Kind 17: orders for a `Scan`. Wire: `u32` agents, `u32` count, orders
    /// (`u64` token, `u32` store, `u8` kind).
    Orders { agents: u32, orders: Vec<Order> },
    /// Kind 18: for each uploaded page, whether the broker took it. Wire:
    /// `u32` count, (`u32` store, `u8` ok).
    Filled { results: Vec<(u32, bool)> },
    /// Kind 19: the broker refuses the agent and closes. Wire: `u16` length,
    /// UTF-8 bytes.
    Refused { reason: String },
    /// Kind 20: whether a `Resume` took the old references over. Wire: `u8`.
    Resumed { ok: bool },
    /// Kind 21: the daemon's `pages_shared` and `pages_sharing` now, over
    /// all its domains (the kernel's are host-wide). Wire: two `u64`s.
    Totals { pages_shared: u64, pages_sharing: u64 },
}

impl Msg {
    /// The message's kind number on the wire.
    pub fn kind(&self) -> u16 {
        match self {
            Msg::Hello { .. } => K_HELLO,
            Msg::Scan { .. } => K_SCAN,
            Msg::Fill { .. } => K_FILL,
            Msg::Report { .. } => K_REPORT,
            Msg::FullScan => K_FULL_SCAN,
            Msg::Resume { .. } => K_RESUME,
            Msg::Holding { .. } => K_HOLDING,
            Msg::Resumed { .. } => K_RESUMED,
            Msg::Welcome { .. } => K_WELCOME,
            Msg::Orders { .. } => K_ORDERS,
            Msg::Filled { .. } => K_FILLED,
            Msg::Refused { .. } => K_REFUSED,
            Msg::AskTotals => K_ASK_TOTALS,
            Msg::Totals { .. } => K_TOTALS,
        }
    }

    /// The message's name, for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Msg::Hello { .. } => "Hello",
            Msg::Scan { .. } => "Scan",
            Msg::Fill { .. } => "Fill",
            Msg::Report { .. } => "Report",
            Msg::FullScan => "FullScan",
            Msg::Resume { .. } => "Resume",
            Msg::Holding { .. } => "Holding",
            Msg::Resumed { .. } => "Resumed",
            Msg::Welcome { .. } => "Welcome",
            Msg::Orders { .. } => "Orders",
            Msg::Filled { .. } => "Filled",
            Msg::Refused { .. } => "Refused",
            Msg::AskTotals => "AskTotals",
            Msg::Totals { .. } => "Totals",
        }
    }
}

/// Why bytes are not a message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtoError {
    /// The input ends before the frame does: at least this many more bytes
    /// are needed (exactly this many once the header is complete).
    #[error("need {0} more bytes")]
    Incomplete(usize),
    #[error("unsupported protocol version {0}")]
    Version(u16),
    #[error("unknown message kind {0}")]
    Kind(u16),
    /// The header announces a payload of this many bytes, more than any
    /// message of its kind can have.
    #[error("message of {0} bytes is too large")]
    TooLarge(usize),
    #[error("malformed message: {0}")]
    Malformed(&'static str),
}

/// Whether `name` is a valid domain name: 1 to [`MAX_DOMAIN`] bytes of
/// `[A-Za-z0-9._:-]`.
pub fn valid_domain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_DOMAIN
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// Checks that `msg` is within the protocol's limits, i.e. that its encoding
/// decodes. [`encode`] does not check: a message that fails here encodes to a
/// frame the peer refuses.
pub fn validate(msg: &Msg) -> Result<(), ProtoError> {
    let count = |n: usize, max: usize, what: &'static str| if n > max { Err(ProtoError::Malformed(what)) } else { Ok(()) };
    match msg {
        Msg::Hello { domain: Some(d), .. } if !valid_domain(d) => Err(ProtoError::Malformed("bad domain name")),
        Msg::Scan { items } => count(items.len(), MAX_ITEMS, "too many candidates"),
        Msg::Fill { pages } => count(pages.len(), MAX_FILL, "too many pages"),
        Msg::Report { committed, cancelled, released, retired } => {
            count(committed.len(), MAX_ITEMS, "too many report entries")?;
            count(cancelled.len(), MAX_ITEMS, "too many report entries")?;
            count(released.len(), MAX_ITEMS, "too many report entries")?;
            count(retired.len(), MAX_ITEMS, "too many report entries")
        }
        Msg::Orders { orders, .. } => count(orders.len(), MAX_ITEMS, "too many orders"),
        Msg::Filled { results } => count(results.len(), MAX_ITEMS, "too many results"),
        Msg::Holding { store, .. } => count(store.len(), MAX_ITEMS, "too many holdings"),
        Msg::Refused { reason } => count(reason.len(), MAX_REASON, "reason too long"),
        _ => Ok(()),
    }
}

fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_le_bytes());
}
fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}
fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}
/// A count or length field; anything that does not fit is written as the
/// field's maximum, which the decoder refuses.
fn put_len32(out: &mut Vec<u8>, n: usize) {
    put_u32(out, u32::try_from(n).unwrap_or(u32::MAX));
}

/// A list of `u32`s: its count, then the values.
fn put_u32s(out: &mut Vec<u8>, list: &[u32]) {
    put_len32(out, list.len());
    for &v in list {
        put_u32(out, v);
    }
}

/// Bytes of the payload of `msg`.
fn payload_len(msg: &Msg) -> usize {
    match msg {
        Msg::Hello { domain, .. } => 5 + domain.as_ref().map_or(0, |d| d.len()),
        Msg::Scan { items } => 4 + items.len() * CANDIDATE_BYTES,
        Msg::Fill { pages } => 4 + pages.len() * FILL_PAGE_BYTES,
        Msg::Report { committed, cancelled, released, retired } => {
            16 + 4 * (committed.len() + cancelled.len() + released.len() + retired.len())
        }
        Msg::FullScan | Msg::AskTotals => 0,
        Msg::Totals { .. } => 16,
        Msg::Resume { .. } => 4,
        Msg::Holding { store, .. } => 5 + 4 * store.len(),
        Msg::Resumed { .. } => 1,
        Msg::Welcome { .. } => 8,
        Msg::Orders { orders, .. } => 8 + orders.len() * ORDER_BYTES,
        Msg::Filled { results } => 4 + results.len() * RESULT_BYTES,
        Msg::Refused { reason } => 2 + reason.len(),
    }
}

/// Bytes of the frame of `msg`.
pub fn encoded_len(msg: &Msg) -> usize {
    HEADER + payload_len(msg)
}

/// Appends the frame of `msg` to `out`. A message beyond the protocol's
/// limits (see [`validate`]) yields a frame the peer refuses.
pub fn encode(msg: &Msg, out: &mut Vec<u8>) {
    let len = payload_len(msg);
    out.reserve(HEADER + len);
    let start = out.len();
    put_len32(out, len);
    put_u16(out, VERSION);
    put_u16(out, msg.kind());
    match msg {
        Msg::Hello { pid, domain } => {
            put_u32(out, *pid);
            match domain {
                // A name too long for its length byte (which validate()
                // refuses) is cut to fit, keeping the frame well-formed.
                Some(d) => {
                    let bytes = &d.as_bytes()[..d.len().min(u8::MAX as usize)];
                    out.push(bytes.len() as u8);
                    out.extend_from_slice(bytes);
                }
                None => out.push(0),
            }
        }
        Msg::Scan { items } => {
            put_len32(out, items.len());
            for c in items {
                put_u64(out, c.token);
                put_u64(out, c.digest);
                out.push(c.stable as u8);
            }
        }
        Msg::Fill { pages } => {
            put_len32(out, pages.len());
            for p in pages {
                put_u32(out, p.store);
                put_u64(out, p.digest);
                out.extend_from_slice(&p.bytes[..]);
            }
        }
        Msg::Report { committed, cancelled, released, retired } => {
            for list in [committed, cancelled, released, retired] {
                put_u32s(out, list);
            }
        }
        Msg::Holding { store, done } => {
            out.push(*done as u8);
            put_u32s(out, store);
        }
        Msg::FullScan | Msg::AskTotals => {}
        Msg::Totals { pages_shared, pages_sharing } => {
            put_u64(out, *pages_shared);
            put_u64(out, *pages_sharing);
        }
        Msg::Resume { agent_id } => put_u32(out, *agent_id),
        Msg::Resumed { ok } => out.push(*ok as u8),
        Msg::Welcome { agent_id, agents } => {
            put_u32(out, *agent_id);
            put_u32(out, *agents);
        }
        Msg::Orders { agents, orders } => {
            put_u32(out, *agents);
            put_len32(out, orders.len());
            for o in orders {
                put_u64(out, o.token);
                put_u32(out, o.store);
                out.push(o.kind as u8);
            }
        }
        Msg::Filled { results } => {
            put_len32(out, results.len());
            for &(store, ok) in results {
                put_u32(out, store);
                out.push(ok as u8);
            }
        }
        Msg::Refused { reason } => {
            put_u16(out, u16::try_from(reason.len()).unwrap_or(u16::MAX));
            out.extend_from_slice(reason.as_bytes());
        }
    }
    // The payload length written up front is the length written: a length
    // that overflowed its field was written as its maximum instead.
    let written = out.len() - start - HEADER;
    debug_assert!(written == len || matches!(msg, Msg::Hello { .. }));
    let actual = u32::try_from(written).unwrap_or(u32::MAX).to_le_bytes();
    out[start..start + 4].copy_from_slice(&actual);
}

/// Checks a frame header — the first [`HEADER`] bytes of `header` — and
/// returns the size of the whole frame (header included).
///
/// Errors: `Incomplete` when fewer than [`HEADER`] bytes are given,
/// `Version`, `Kind`, and `TooLarge` when the announced payload exceeds what
/// any message of that kind can hold (at most [`MAX_PAYLOAD`]).
pub fn frame_len(header: &[u8]) -> Result<usize, ProtoError> {
    let Some(h) = header.get(..HEADER) else {
        return Err(ProtoError::Incomplete(HEADER - header.len()));
    };
    let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
    let version = u16::from_le_bytes([h[4], h[5]]);
    let kind = u16::from_le_bytes([h[6], h[7]]);
    if version != VERSION {
        return Err(ProtoError::Version(version));
    }
    let max = max_payload(kind).ok_or(ProtoError::Kind(kind))?;
    if len > max {
        return Err(ProtoError::TooLarge(len));
    }
    Ok(HEADER + len)
}

/// A cursor over a payload; every read checks the bytes left.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtoError> {
        if n > self.buf.len() {
            return Err(ProtoError::Malformed("payload too short"));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], ProtoError> {
        let mut a = [0; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, ProtoError> {
        Ok(self.array::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, ProtoError> {
        self.array().map(u16::from_le_bytes)
    }
    fn u32(&mut self) -> Result<u32, ProtoError> {
        self.array().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Result<u64, ProtoError> {
        self.array().map(u64::from_le_bytes)
    }
    fn bool(&mut self) -> Result<bool, ProtoError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(ProtoError::Malformed("boolean not 0 or 1")),
        }
    }
    fn left(&self) -> usize {
        self.buf.len()
    }
    /// Reads a list count and checks it against `max` and the bytes left:
    /// `count * item` must be exactly what is left (`exact`) or at most that.
    fn count(&mut self, max: usize, item: usize, exact: bool, what: &'static str) -> Result<usize, ProtoError> {
        let n = self.u32()? as usize;
        if n > max {
            return Err(ProtoError::Malformed(what));
        }
        let need = n * item; // n <= MAX_ITEMS, item <= 4108: no overflow
        if need > self.left() || (exact && need != self.left()) {
            return Err(ProtoError::Malformed("count does not match payload length"));
        }
        Ok(n)
    }
    fn u32s(&mut self, max: usize, exact: bool) -> Result<Vec<u32>, ProtoError> {
        let n = self.count(max, 4, exact, "too many report entries")?;
        (0..n).map(|_| self.u32()).collect()
    }
    fn finish(&self) -> Result<(), ProtoError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(ProtoError::Malformed("trailing bytes in payload"))
        }
    }
}

/// Decodes the frame at the start of `buf`; returns the message and the
/// bytes it took (the frame size; `buf` may hold more).
pub fn decode(buf: &[u8]) -> Result<(Msg, usize), ProtoError> {
    let total = frame_len(buf)?;
    if buf.len() < total {
        return Err(ProtoError::Incomplete(total - buf.len()));
    }
    let kind = u16::from_le_bytes([buf[6], buf[7]]);
    let mut r = Reader { buf: &buf[HEADER..total] };
    let msg = match kind {
        K_HELLO => {
            let pid = r.u32()?;
            let len = r.u8()? as usize;
            if len != r.left() {
                return Err(ProtoError::Malformed("domain length does not match payload length"));
            }
            let domain = if len == 0 {
                None
            } else {
                let bytes = r.take(len)?;
                let name = std::str::from_utf8(bytes).map_err(|_| ProtoError::Malformed("bad domain name"))?;
                if !valid_domain(name) {
                    return Err(ProtoError::Malformed("bad domain name"));
                }
                Some(name.to_owned())
            };
            Msg::Hello { pid, domain }
        }
        K_SCAN => {
            let n = r.count(MAX_ITEMS, CANDIDATE_BYTES, true, "too many candidates")?;
            let mut items = Vec::with_capacity(n);
            for _ in 0..n {
                items.push(Candidate { token: r.u64()?, digest: r.u64()?, stable: r.bool()? });
            }
            Msg::Scan { items }
        }
        K_FILL => {
            let n = r.count(MAX_FILL, FILL_PAGE_BYTES, true, "too many pages")?;
            let mut pages = Vec::with_capacity(n);
            for _ in 0..n {
                let store = r.u32()?;
                let digest = r.u64()?;
                let mut bytes = Box::new([0u8; PAGE]);
                bytes.copy_from_slice(r.take(PAGE)?);
                pages.push(FillPage { store, digest, bytes });
            }
            Msg::Fill { pages }
        }
        K_REPORT => {
            let committed = r.u32s(MAX_ITEMS, false)?;
            let cancelled = r.u32s(MAX_ITEMS, false)?;
            let released = r.u32s(MAX_ITEMS, false)?;
            let retired = r.u32s(MAX_ITEMS, true)?;
            Msg::Report { committed, cancelled, released, retired }
        }
        K_FULL_SCAN => Msg::FullScan,
        K_ASK_TOTALS => Msg::AskTotals,
        K_TOTALS => Msg::Totals { pages_shared: r.u64()?, pages_sharing: r.u64()? },
        K_RESUME => Msg::Resume { agent_id: r.u32()? },
        K_HOLDING => {
            let done = r.bool()?;
            Msg::Holding { store: r.u32s(MAX_ITEMS, true)?, done }
        }
        K_RESUMED => Msg::Resumed { ok: r.bool()? },
        K_WELCOME => Msg::Welcome { agent_id: r.u32()?, agents: r.u32()? },
        K_ORDERS => {
            let agents = r.u32()?;
            let n = r.count(MAX_ITEMS, ORDER_BYTES, true, "too many orders")?;
            let mut orders = Vec::with_capacity(n);
            for _ in 0..n {
                let token = r.u64()?;
                let store = r.u32()?;
                let kind = match r.u8()? {
                    1 => OrderKind::Join,
                    2 => OrderKind::Upload,
                    _ => return Err(ProtoError::Malformed("unknown order kind")),
                };
                orders.push(Order { token, store, kind });
            }
            Msg::Orders { agents, orders }
        }
        K_FILLED => {
            let n = r.count(MAX_ITEMS, RESULT_BYTES, true, "too many results")?;
            let mut results = Vec::with_capacity(n);
            for _ in 0..n {
                results.push((r.u32()?, r.bool()?));
            }
            Msg::Filled { results }
        }
        K_REFUSED => {
            let len = r.u16()? as usize;
            if len > MAX_REASON {
                return Err(ProtoError::Malformed("reason too long"));
            }
            if len != r.left() {
                return Err(ProtoError::Malformed("reason length does not match payload length"));
            }
            let reason = std::str::from_utf8(r.take(len)?).map_err(|_| ProtoError::Malformed("reason not UTF-8"))?;
            Msg::Refused { reason: reason.to_owned() }
        }
        // frame_len admitted only known kinds.
        other => return Err(ProtoError::Kind(other)),
    };
    r.finish()?;
    Ok((msg, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(msg: &Msg) -> Vec<u8> {
        let mut out = Vec::new();
        encode(msg, &mut out);
        out
    }

    fn roundtrip(msg: Msg) {
        validate(&msg).unwrap();
        let bytes = frame(&msg);
        assert_eq!(bytes.len(), encoded_len(&msg));
        assert_eq!(frame_len(&bytes), Ok(bytes.len()));
        assert_eq!(decode(&bytes), Ok((msg.clone(), bytes.len())));
        // Trailing bytes after the frame are not consumed.
        let mut longer = bytes.clone();
        longer.extend_from_slice(&frame(&Msg::FullScan));
        assert_eq!(decode(&longer), Ok((msg, bytes.len())));
        // Every strict prefix is incomplete.
        for cut in [0, 1, HEADER - 1, HEADER, bytes.len() - 1] {
            if cut < bytes.len() {
                let want = if cut < HEADER { HEADER - cut } else { bytes.len() - cut };
                assert_eq!(decode(&bytes[..cut]), Err(ProtoError::Incomplete(want)), "cut at {cut}");
            }
        }
    }

    fn page(seed: u8) -> Box<[u8; PAGE]> {
        let mut p = Box::new([0u8; PAGE]);
        for (i, b) in p.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(31).wrapping_add(seed);
        }
        p
    }

    /// Header with an arbitrary length, version and kind.
    fn header(len: u32, version: u16, kind: u16) -> Vec<u8> {
        let mut h = Vec::new();
        put_u32(&mut h, len);
        put_u16(&mut h, version);
        put_u16(&mut h, kind);
        h
    }

    /// A frame with the given kind and raw payload.
    fn raw(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = header(payload.len() as u32, VERSION, kind);
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn roundtrip_every_variant() {
        roundtrip(Msg::Hello { pid: 1234, domain: None });
        roundtrip(Msg::Resume { agent_id: 77 });
        roundtrip(Msg::Resumed { ok: true });
        roundtrip(Msg::Resumed { ok: false });
        roundtrip(Msg::Holding { store: vec![], done: true });
        roundtrip(Msg::Holding { store: vec![7, 7, 3, u32::MAX], done: false });
        roundtrip(Msg::Holding { store: (0..MAX_ITEMS as u32).collect(), done: true });
        roundtrip(Msg::Hello { pid: u32::MAX, domain: Some("qemu-guests.a_b:c".into()) });
        roundtrip(Msg::Hello { pid: 0, domain: Some("x".repeat(MAX_DOMAIN)) });
        roundtrip(Msg::Scan { items: vec![] });
        roundtrip(Msg::Scan {
            items: vec![Candidate { token: 1, digest: u64::MAX, stable: true }, Candidate { token: u64::MAX, digest: 0, stable: false }],
        });
        roundtrip(Msg::Fill { pages: vec![] });
        roundtrip(Msg::Fill { pages: vec![FillPage { store: 7, digest: 99, bytes: page(3) }] });
        roundtrip(Msg::Report { committed: vec![], cancelled: vec![], released: vec![], retired: vec![] });
        roundtrip(Msg::Report { committed: vec![1, 2], cancelled: vec![], released: vec![u32::MAX], retired: vec![7] });
        roundtrip(Msg::Report { committed: vec![], cancelled: vec![5], released: vec![], retired: vec![] });
        roundtrip(Msg::FullScan);
        roundtrip(Msg::AskTotals);
        roundtrip(Msg::Totals { pages_shared: 3, pages_sharing: u64::MAX });
        roundtrip(Msg::Welcome { agent_id: 3, agents: 4 });
        roundtrip(Msg::Orders { agents: 2, orders: vec![] });
        roundtrip(Msg::Orders {
            agents: 2,
            orders: vec![Order { token: 5, store: 6, kind: OrderKind::Join }, Order { token: 7, store: 8, kind: OrderKind::Upload }],
        });
        roundtrip(Msg::Filled { results: vec![] });
        roundtrip(Msg::Filled { results: vec![(1, true), (2, false)] });
        roundtrip(Msg::Refused { reason: String::new() });
        roundtrip(Msg::Refused { reason: "domain belongs to another user — é".into() });
        roundtrip(Msg::Refused { reason: "r".repeat(MAX_REASON) });
    }

    #[test]
    fn roundtrip_maximum_sizes() {
        let pages = (0..MAX_FILL).map(|i| FillPage { store: i as u32, digest: !(i as u64), bytes: page(i as u8) }).collect();
        roundtrip(Msg::Fill { pages });
        let items = (0..MAX_ITEMS as u64).map(|i| Candidate { token: i, digest: i * 3, stable: i % 2 == 0 }).collect();
        roundtrip(Msg::Scan { items });
        let orders = (0..MAX_ITEMS as u64)
            .map(|i| Order { token: i, store: i as u32, kind: if i % 3 == 0 { OrderKind::Upload } else { OrderKind::Join } })
            .collect();
        roundtrip(Msg::Orders { agents: 9, orders });
        let full: Vec<u32> = (0..MAX_ITEMS as u32).collect();
        roundtrip(Msg::Report { committed: full.clone(), cancelled: full.clone(), released: full.clone(), retired: full.clone() });
        roundtrip(Msg::Filled { results: full.iter().map(|&i| (i, i % 2 == 1)).collect() });
    }

    #[test]
    fn header_checks() {
        assert_eq!(frame_len(&[]), Err(ProtoError::Incomplete(HEADER)));
        assert_eq!(frame_len(&[0; 5]), Err(ProtoError::Incomplete(3)));
        assert_eq!(decode(&[1, 0, 0]), Err(ProtoError::Incomplete(5)));
        assert_eq!(frame_len(&header(0, 2, K_FULL_SCAN)), Err(ProtoError::Version(2)));
        assert_eq!(frame_len(&header(0, 0, K_FULL_SCAN)), Err(ProtoError::Version(0)));
        assert_eq!(decode(&header(0, 7, 999)), Err(ProtoError::Version(7)));
        for kind in [0, 9, 15, 22, u16::MAX] {
            assert_eq!(frame_len(&header(0, VERSION, kind)), Err(ProtoError::Kind(kind)));
        }
        // Oversized announcements fail from the header alone.
        let huge = header(u32::MAX, VERSION, K_FILL);
        assert_eq!(decode(&huge), Err(ProtoError::TooLarge(u32::MAX as usize)));
        let over = (MAX_PAYLOAD + 1) as u32;
        assert_eq!(frame_len(&header(over, VERSION, K_SCAN)), Err(ProtoError::TooLarge(over as usize)));
        // Each kind's own limit.
        assert_eq!(frame_len(&header(1, VERSION, K_FULL_SCAN)), Err(ProtoError::TooLarge(1)));
        assert_eq!(frame_len(&header(9, VERSION, K_WELCOME)), Err(ProtoError::TooLarge(9)));
        assert_eq!(frame_len(&header(261, VERSION, K_HELLO)), Err(ProtoError::TooLarge(261)));
        assert_eq!(frame_len(&header(260, VERSION, K_HELLO)), Ok(268));
        let fill_max = 4 + MAX_FILL * FILL_PAGE_BYTES;
        assert_eq!(frame_len(&header(fill_max as u32, VERSION, K_FILL)), Ok(HEADER + fill_max));
        assert_eq!(frame_len(&header(fill_max as u32 + 1, VERSION, K_FILL)), Err(ProtoError::TooLarge(fill_max + 1)));
        // A valid header with its payload missing is incomplete by exactly
        // the missing bytes.
        assert_eq!(decode(&header(100, VERSION, K_SCAN)), Err(ProtoError::Incomplete(100)));
    }

    #[test]
    fn counts_must_match_the_payload() {
        let mut p = Vec::new();
        put_u32(&mut p, 2);
        p.extend_from_slice(&[0; CANDIDATE_BYTES]);
        // Count says 2, one item present.
        assert!(matches!(decode(&raw(K_SCAN, &p)), Err(ProtoError::Malformed(_))));
        // Count says 0, one item present (trailing bytes).
        p[..4].copy_from_slice(&0u32.to_le_bytes());
        assert!(matches!(decode(&raw(K_SCAN, &p)), Err(ProtoError::Malformed(_))));
        // A huge count with a small payload allocates nothing and fails.
        p[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(decode(&raw(K_SCAN, &p)), Err(ProtoError::Malformed(_))));
        // Orders: count after the agents field.
        let mut o = Vec::new();
        put_u32(&mut o, 1);
        put_u32(&mut o, 1);
        o.extend_from_slice(&[0; ORDER_BYTES - 1]);
        o.push(1);
        assert!(decode(&raw(K_ORDERS, &o)).is_ok());
        o.push(0);
        assert!(matches!(decode(&raw(K_ORDERS, &o)), Err(ProtoError::Malformed(_))));
        // Report: a first list longer than the payload.
        let mut r = Vec::new();
        put_u32(&mut r, 3);
        put_u32(&mut r, 0);
        put_u32(&mut r, 0);
        assert!(matches!(decode(&raw(K_REPORT, &r)), Err(ProtoError::Malformed(_))));
        // Report: a missing third list.
        let r = [0u8; 8];
        assert!(matches!(decode(&raw(K_REPORT, &r)), Err(ProtoError::Malformed(_))));
        // Report: trailing bytes after the third list.
        let r = [0u8; 13];
        assert!(matches!(decode(&raw(K_REPORT, &r)), Err(ProtoError::Malformed(_))));
        // Fill: a page cut short.
        let mut f = Vec::new();
        put_u32(&mut f, 1);
        f.extend_from_slice(&[0; FILL_PAGE_BYTES - 1]);
        assert!(matches!(decode(&raw(K_FILL, &f)), Err(ProtoError::Malformed(_))));
        // Empty payloads where fields are expected.
        for kind in [K_HELLO, K_SCAN, K_FILL, K_REPORT, K_WELCOME, K_ORDERS, K_FILLED, K_REFUSED] {
            assert!(matches!(decode(&raw(kind, &[])), Err(ProtoError::Malformed(_))), "kind {kind}");
        }
        // Welcome with a short or long payload.
        assert!(matches!(decode(&raw(K_WELCOME, &[0; 7])), Err(ProtoError::Malformed(_))));
    }

    #[test]
    fn counts_over_the_limits() {
        // Counts above the limits are refused even when the payload would
        // hold them (the header limit then comes first).
        let mut p = Vec::new();
        put_u32(&mut p, MAX_FILL as u32 + 1);
        assert!(matches!(decode(&raw(K_FILL, &p)), Err(ProtoError::Malformed(_))));
        let mut p = Vec::new();
        put_u32(&mut p, MAX_ITEMS as u32 + 1);
        p.resize(4 + (MAX_ITEMS + 1) * 4, 0);
        assert!(matches!(decode(&raw(K_FILLED, &p[..4])), Err(ProtoError::Malformed(_))));
        let mut r = p.clone();
        r.extend_from_slice(&[0; 8]);
        assert_eq!(decode(&raw(K_REPORT, &r)), Err(ProtoError::Malformed("too many report entries")));
        // Within the report's frame limit, a list over MAX_ITEMS.
        let mut r = Vec::new();
        put_u32(&mut r, MAX_ITEMS as u32 + 1);
        r.resize(4 + (MAX_ITEMS + 1) * 4, 0);
        put_u32(&mut r, MAX_ITEMS as u32 - 1);
        r.resize(r.len() + (MAX_ITEMS - 1) * 4, 0);
        put_u32(&mut r, 0);
        assert!(frame_len(&raw(K_REPORT, &r)).is_ok());
        assert_eq!(decode(&raw(K_REPORT, &r)), Err(ProtoError::Malformed("too many report entries")));
        // Validation mirrors the decoder.
        assert!(validate(&Msg::Fill { pages: vec![FillPage { store: 0, digest: 0, bytes: page(0) }; MAX_FILL + 1] }).is_err());
        assert!(validate(&Msg::Scan { items: vec![Candidate { token: 0, digest: 0, stable: false }; MAX_ITEMS + 1] }).is_err());
        assert!(validate(&Msg::Refused { reason: "x".repeat(MAX_REASON + 1) }).is_err());
        assert!(validate(&Msg::Report { committed: vec![], cancelled: vec![0; MAX_ITEMS + 1], released: vec![], retired: vec![] }).is_err());
    }

    #[test]
    fn booleans_and_enums_are_strict() {
        let mut c = Vec::new();
        put_u32(&mut c, 1);
        put_u64(&mut c, 1);
        put_u64(&mut c, 2);
        c.push(2);
        assert_eq!(decode(&raw(K_SCAN, &c)), Err(ProtoError::Malformed("boolean not 0 or 1")));
        let mut f = Vec::new();
        put_u32(&mut f, 1);
        put_u32(&mut f, 1);
        f.push(255);
        assert_eq!(decode(&raw(K_FILLED, &f)), Err(ProtoError::Malformed("boolean not 0 or 1")));
        for bad in [0u8, 3, 255] {
            let mut o = Vec::new();
            put_u32(&mut o, 1);
            put_u32(&mut o, 1);
            put_u64(&mut o, 1);
            put_u32(&mut o, 1);
            o.push(bad);
            assert_eq!(decode(&raw(K_ORDERS, &o)), Err(ProtoError::Malformed("unknown order kind")));
        }
    }

    #[test]
    fn domain_names() {
        for good in ["a", "uid:1000", "Guest-1.prod_x", &"z".repeat(MAX_DOMAIN)] {
            assert!(valid_domain(good), "{good}");
        }
        for bad in ["", "a b", "a/b", "é", "a\0", "x;y", &"z".repeat(MAX_DOMAIN + 1)] {
            assert!(!valid_domain(bad), "{bad:?}");
            assert!(validate(&Msg::Hello { pid: 1, domain: Some(bad.to_string()) }).is_err());
        }
        let hello = |name: &[u8], len: u8| {
            let mut p = Vec::new();
            put_u32(&mut p, 42);
            p.push(len);
            p.extend_from_slice(name);
            decode(&raw(K_HELLO, &p))
        };
        assert_eq!(hello(b"ok.name", 7).unwrap().0, Msg::Hello { pid: 42, domain: Some("ok.name".into()) });
        assert_eq!(hello(b"", 0).unwrap().0, Msg::Hello { pid: 42, domain: None });
        assert_eq!(hello(b"a b", 3), Err(ProtoError::Malformed("bad domain name")));
        assert_eq!(hello(&[0xff, 0xfe], 2), Err(ProtoError::Malformed("bad domain name")));
        assert!(matches!(hello(b"abc", 2), Err(ProtoError::Malformed(_))), "trailing byte");
        assert!(matches!(hello(b"abc", 4), Err(ProtoError::Malformed(_))), "short name");
        assert!(matches!(hello(b"", 1), Err(ProtoError::Malformed(_))));
    }

    #[test]
    fn refused_reasons() {
        let reason = |text: &[u8], len: u16| {
            let mut p = Vec::new();
            put_u16(&mut p, len);
            p.extend_from_slice(text);
            decode(&raw(K_REFUSED, &p))
        };
        assert_eq!(reason(b"no", 2).unwrap().0, Msg::Refused { reason: "no".into() });
        assert_eq!(reason(&[0xc3, 0x28], 2), Err(ProtoError::Malformed("reason not UTF-8")));
        let long = vec![b'x'; MAX_REASON + 1];
        // The frame limit catches a long reason from the header alone; a
        // length field over the limit is refused whatever follows.
        assert_eq!(reason(&long, long.len() as u16), Err(ProtoError::TooLarge(2 + MAX_REASON + 1)));
        assert_eq!(reason(b"xx", MAX_REASON as u16 + 1), Err(ProtoError::Malformed("reason too long")));
        assert!(matches!(reason(b"abc", 2), Err(ProtoError::Malformed(_))));
        assert!(matches!(reason(b"ab", 3), Err(ProtoError::Malformed(_))));
    }

    #[test]
    fn trailing_bytes_are_malformed() {
        for msg in [
            Msg::Hello { pid: 1, domain: Some("d".into()) },
            Msg::Scan { items: vec![Candidate { token: 1, digest: 2, stable: true }] },
            Msg::Report { committed: vec![1], cancelled: vec![], released: vec![2], retired: vec![] },
            Msg::Welcome { agent_id: 1, agents: 1 },
            Msg::Orders { agents: 1, orders: vec![] },
            Msg::Filled { results: vec![(1, true)] },
            Msg::Refused { reason: "r".into() },
        ] {
            let mut f = frame(&msg);
            f.push(0);
            let len = u32::from_le_bytes(f[..4].try_into().unwrap()) + 1;
            f[..4].copy_from_slice(&len.to_le_bytes());
            assert!(matches!(decode(&f), Err(ProtoError::Malformed(_)) | Err(ProtoError::TooLarge(_))), "{msg:?}");
        }
        let mut f = frame(&Msg::FullScan);
        f[0] = 1;
        f.push(0);
        assert_eq!(decode(&f), Err(ProtoError::TooLarge(1)));
    }
}
