//! Where an execution stands in its plan: which injection comes next and when it is due.

use super::schedule::Trigger;

/// The next injection of a plan and what is known of its moment.
pub(super) struct Cursor<'p> {
    injections: &'p [Trigger],
    /// Index of the next injection.
    next: usize,
    /// When the next injection is due (absolute instruction count), once known.
    due: Option<u64>,
    /// Times the next injection's symbolic point was reached.
    hits: u32,
}

impl<'p> Cursor<'p> {
    /// A cursor before the first of `injections`, at instruction 0.
    pub fn new(injections: &'p [Trigger]) -> Self {
        let mut cursor = Self { injections, next: 0, due: None, hits: 0 };
        cursor.arm(0);
        cursor
    }

    /// Computes when the next injection is due, relative to `insn`.
    fn arm(&mut self, insn: u64) {
        self.hits = 0;
        self.due = match self.injections.get(self.next) {
            Some(Trigger::After(n)) => Some(insn + n),
            _ => None,
        };
    }

    /// Whether injections remain.
    pub fn pending(&self) -> bool {
        self.next < self.injections.len()
    }

    /// Whether the moment of the next injection is an instruction count, so that reaching it
    /// takes stepping: an `after` delay, or a symbolic point already reached and its `extra`.
    pub fn counting(&self) -> bool {
        self.due.is_some()
    }

    /// The address of the symbolic point the next injection waits for, if it waits for one.
    pub fn awaited_point(&self) -> Option<u64> {
        match self.injections.get(self.next) {
            Some(&Trigger::At { address, .. }) if self.due.is_none() => Some(address),
            _ => None,
        }
    }

    /// The guest stopped at `pc` after `insn` instructions: counts a symbolic point's hit and,
    /// at its occurrence, makes the injection due `extra` instructions later.
    pub fn reached(&mut self, pc: u64, insn: u64) {
        if let Some(&Trigger::At { address, occurrence, extra }) = self.injections.get(self.next)
            && self.due.is_none()
            && pc == address
        {
            self.hits += 1;
            if self.hits == occurrence {
                self.due = Some(insn + extra);
            }
        }
    }

    /// If the next injection is due at `insn`, moves past it and returns its index.
    pub fn take_due(&mut self, insn: u64) -> Option<usize> {
        if self.due != Some(insn) {
            return None;
        }
        let index = self.next;
        self.next += 1;
        self.arm(insn);
        Some(index)
    }
}
