//! The writes a ublk queue must be able to send again: every write the daemon acknowledged
//! that no flush has covered yet. A daemon that dies loses those (their qcow2 metadata lived
//! in its cache) while a flush re-sent to its successor would succeed, so a new link replays
//! them, in order, before anything else. Pure bookkeeping: no I/O, tested on its own.

use std::collections::VecDeque;

/// One acknowledged request that no flush has covered yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unflushed {
    /// Its place in acknowledgement order.
    pub seq: u64,
    /// The NBD command (write, trim, write-zeroes).
    pub kind: u16,
    /// Its NBD flags.
    pub flags: u16,
    /// Byte offset.
    pub offset: u64,
    /// Byte length.
    pub length: u32,
    /// The data written (empty for trim and write-zeroes).
    pub data: Vec<u8>,
}

/// Acknowledged, unflushed requests in acknowledgement order.
#[derive(Debug, Default)]
pub struct ReplayBuffer {
    requests: VecDeque<Unflushed>,
    /// The next sequence number.
    seq: u64,
    /// Bytes of data held.
    bytes: usize,
}

impl ReplayBuffer {
    /// The sequence number the next acknowledged request will get: a flush sent now covers
    /// everything below it.
    pub fn next_seq(&self) -> u64 {
        self.seq
    }

    /// Keeps a request the daemon acknowledged.
    pub fn acknowledged(&mut self, kind: u16, flags: u16, offset: u64, length: u32, data: &[u8]) {
        let seq = self.seq;
        self.seq += 1;
        self.bytes += data.len();
        self.requests.push_back(Unflushed {
            seq,
            kind,
            flags,
            offset,
            length,
            data: data.to_vec(),
        });
    }

    /// A flush sent when [`ReplayBuffer::next_seq`] was `covers` completed: everything
    /// acknowledged before it is durable and dropped.
    pub fn flushed(&mut self, covers: u64) {
        while self.requests.front().is_some_and(|e| e.seq < covers) {
            if let Some(done) = self.requests.pop_front() {
                self.bytes -= done.data.len();
            }
        }
    }

    /// Bytes of data held (the queue flushes on its own past a cap).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// What a new link must send again, oldest first.
    pub fn to_replay(&self) -> Vec<Unflushed> {
        self.requests.iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WRITE: u16 = 1;
    const TRIM: u16 = 4;

    #[test]
    fn a_flush_drops_exactly_what_was_acknowledged_before_it_was_sent() {
        let mut b = ReplayBuffer::default();
        b.acknowledged(WRITE, 0, 0, 4, b"aaaa");
        b.acknowledged(TRIM, 0, 4096, 8192, &[]);
        let covers = b.next_seq(); // a flush goes out now…
        b.acknowledged(WRITE, 0, 8, 2, b"bb"); // …and this write is acknowledged before it ends
        assert_eq!(b.bytes(), 6);
        b.flushed(covers);
        let left = b.to_replay();
        assert_eq!(left.len(), 1, "the write after the flush was sent is not covered");
        assert_eq!((left[0].kind, left[0].offset, left[0].data.as_slice()), (WRITE, 8, &b"bb"[..]));
        assert_eq!(b.bytes(), 2);
    }

    #[test]
    fn replay_is_in_acknowledgement_order_and_keeps_each_request_whole() {
        let mut b = ReplayBuffer::default();
        for i in 0..5u8 {
            b.acknowledged(WRITE, 1, u64::from(i) * 512, 1, &[i]);
        }
        let replay = b.to_replay();
        let order: Vec<(u64, u64, u8)> =
            replay.iter().map(|u| (u.seq, u.offset, u.data[0])).collect();
        assert_eq!(order, [(0, 0, 0), (1, 512, 1), (2, 1024, 2), (3, 1536, 3), (4, 2048, 4)]);
        assert!(replay.iter().all(|u| u.flags == 1 && u.length == 1));
        assert_eq!(b.to_replay(), replay, "looking does not consume");
    }

    #[test]
    fn an_old_flush_finishing_late_drops_nothing_newer_and_a_repeat_is_harmless() {
        let mut b = ReplayBuffer::default();
        let early = b.next_seq();
        b.acknowledged(WRITE, 0, 0, 3, b"abc");
        b.flushed(early);
        assert_eq!(b.bytes(), 3, "a flush sent before the write does not cover it");
        let now = b.next_seq();
        b.flushed(now);
        b.flushed(now);
        assert_eq!((b.bytes(), b.to_replay().len()), (0, 0));
        assert_eq!(b.next_seq(), 1, "sequence numbers are never reused");
    }
}
