//! The guest's mailbox, read at its reports: DONE's counters and PANIC's record.

use nmifuzz_abi::{ABI_VERSION, MAILBOX_MAGIC, Mailbox, PANIC_FILE_LEN, PANIC_MESSAGE_LEN, Report};
use zerocopy::{FromBytes, IntoBytes};

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

    /// The guest's panic record as a [`GuestPanic`]. A record the guest cannot have written
    /// whole (the mailbox overwritten, a panic while panicking, a PANIC report from code that
    /// never filled it in) is reported as unreadable, saying why and where the mailbox is,
    /// never as an empty message at an empty location.
    pub(crate) fn guest_panic(&self, mailbox: &Mailbox) -> GuestPanic {
        let record = &mailbox.panic;
        let text = |bytes: &[u8], len: u32| {
            String::from_utf8_lossy(&bytes[..(len as usize).min(bytes.len())]).into_owned()
        };
        let symbol = if record.rip == 0 { String::new() } else { self.image.symbolize(record.rip) };
        if let Some(problem) = self.unreadable(mailbox) {
            return GuestPanic {
                message: format!(
                    "unreadable panic report: {problem} (mailbox at {:#x}); {}",
                    self.mailbox_address,
                    self.overwriter(mailbox)
                ),
                file: NO_LOCATION.into(),
                line: 0,
                column: 0,
                rip: record.rip,
                symbol,
            };
        }
        GuestPanic {
            message: text(&record.message, record.message_len),
            file: text(&record.file, record.file_len),
            line: record.line,
            column: record.column,
            rip: record.rip,
            symbol,
        }
    }

    /// What the run's end says about whatever overwrote the mailbox: where the guest was (RIP,
    /// and RSP with the stack or other region it points into) and what the mailbox's first
    /// qwords now hold, named where they are addresses in the guest (a return address, a frame
    /// pointer into a stack).
    fn overwriter(&self, mailbox: &Mailbox) -> String {
        let regs = self.vcpu.sync_regs().regs;
        let bytes = mailbox.as_bytes();
        let qwords: Vec<String> = bytes[..MAILBOX_QWORDS_SHOWN * 8]
            .chunks_exact(8)
            .map(|q| {
                let value = u64::from_le_bytes(q.try_into().expect("8 bytes"));
                match self.image.locate(value) {
                    Some(_) => format!("{value:#x} ({})", self.image.symbolize(value)),
                    None => format!("{value:#x}"),
                }
            })
            .collect();
        format!(
            "the run ended at {} with RSP {:#x} ({}); the mailbox begins {}",
            self.image.symbolize(regs.rip),
            regs.rsp,
            self.image.symbolize(regs.rsp),
            qwords.join(", ")
        )
    }

    /// Why `mailbox` cannot hold a panic record the guest wrote, if it cannot.
    fn unreadable(&self, mailbox: &Mailbox) -> Option<String> {
        let record = &mailbox.panic;
        if mailbox.magic != MAILBOX_MAGIC {
            return Some(format!(
                "bad magic {:#010x}, expected {MAILBOX_MAGIC:#010x}",
                mailbox.magic
            ));
        }
        if mailbox.version != ABI_VERSION {
            return Some(format!("version {}, expected {ABI_VERSION}", mailbox.version));
        }
        if record.message_len as usize > PANIC_MESSAGE_LEN
            || record.file_len as usize > PANIC_FILE_LEN
        {
            return Some(format!(
                "message length {} (at most {PANIC_MESSAGE_LEN}), file name length {} (at most \
                 {PANIC_FILE_LEN})",
                record.message_len, record.file_len
            ));
        }
        if record.message_len == 0 {
            return Some(format!(
                "the message is empty (file length {}, line {}, rip {:#x})",
                record.file_len, record.line, record.rip
            ));
        }
        None
    }
}

/// Qwords of an overwritten mailbox that the verdict shows.
const MAILBOX_QWORDS_SHOWN: usize = 4;

/// The file name of a panic whose record says nothing about where it was.
const NO_LOCATION: &str = "<no location>";
