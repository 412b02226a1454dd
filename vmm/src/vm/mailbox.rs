//! The guest's mailbox, read at its reports: DONE's counters and PANIC's record.

use nmifuzz_abi::{Mailbox, Report};
use zerocopy::FromBytes;

use super::Vm;
use crate::error::Result;
use crate::outcome::{GuestPanic, Verdict};

impl Vm {
    /// Reads the guest's mailbox.
    pub fn mailbox(&self) -> Result<Mailbox> {
        let mut bytes = [0u8; size_of::<Mailbox>()];
        self.ram.read(self.mailbox_address, &mut bytes)?;
        Ok(Mailbox::read_from_bytes(&bytes).expect("the buffer has the mailbox's exact size"))
    }

    /// Turns a report code into a verdict.
    pub(super) fn report(&self, code: u32) -> Verdict {
        match Report::from_code(code) {
            Some(Report::Done) => Verdict::Done,
            Some(Report::Panic) => match self.mailbox() {
                Ok(mailbox) => Verdict::GuestPanic(self.guest_panic(&mailbox)),
                Err(e) => Verdict::UnexpectedExit { description: format!("PANIC report: {e}") },
            },
            Some(Report::Ready) => {
                Verdict::UnexpectedExit { description: "READY reported a second time".into() }
            }
            None => {
                Verdict::UnexpectedExit { description: format!("unknown report code {code:#x}") }
            }
        }
    }

    fn guest_panic(&self, mailbox: &Mailbox) -> GuestPanic {
        let record = &mailbox.panic;
        let text = |bytes: &[u8], len: u32| {
            String::from_utf8_lossy(&bytes[..(len as usize).min(bytes.len())]).into_owned()
        };
        GuestPanic {
            message: text(&record.message, record.message_len),
            file: text(&record.file, record.file_len),
            line: record.line,
            column: record.column,
            rip: record.rip,
            // 0: a Rust panic, whose caller the guest cannot find; file and line say where.
            symbol: if record.rip == 0 { String::new() } else { self.image.symbolize(record.rip) },
        }
    }
}
