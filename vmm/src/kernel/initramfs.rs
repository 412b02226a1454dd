//! The initramfs nmifuzz gives a real kernel: an uncompressed "newc" cpio archive holding the
//! agent as `/init`, the directories it mounts on, and the console's and /dev/mem's device nodes. It is built in
//! memory at every boot, so nothing needs root or cpio(1), and the same agent gives the same
//! bytes (every timestamp is zero).

/// The agent built from `agent/` by this crate's build script.
pub static AGENT: &[u8] = include_bytes!(env!("NMIFUZZ_AGENT_ELF"));

/// One archive member.
struct Member<'a> {
    name: &'a str,
    mode: u32,
    data: &'a [u8],
    device: (u32, u32),
}

const DIRECTORY: u32 = 0o040755;
const CHARACTER_DEVICE: u32 = 0o020600;
const EXECUTABLE: u32 = 0o100755;

/// The archive with `agent` as `/init`.
pub fn build(agent: &[u8]) -> Vec<u8> {
    let members = [
        Member { name: "dev", mode: DIRECTORY, data: &[], device: (0, 0) },
        Member { name: "proc", mode: DIRECTORY, data: &[], device: (0, 0) },
        Member { name: "sys", mode: DIRECTORY, data: &[], device: (0, 0) },
        // The kernel opens /dev/console for init's standard streams before running it.
        Member { name: "dev/console", mode: CHARACTER_DEVICE, data: &[], device: (5, 1) },
        // The agent maps its doorbell from physical memory (nmifuzz_abi::agent).
        Member { name: "dev/mem", mode: CHARACTER_DEVICE, data: &[], device: (1, 1) },
        Member { name: "init", mode: EXECUTABLE, data: agent, device: (0, 0) },
        Member { name: "TRAILER!!!", mode: 0, data: &[], device: (0, 0) },
    ];
    let mut archive = Vec::new();
    for (inode, member) in members.iter().enumerate() {
        let links = if member.mode & 0o040000 != 0 { 2 } else { 1 };
        // c_ino, c_mode, c_uid, c_gid, c_nlink, c_mtime, c_filesize, c_devmajor, c_devminor,
        // c_rdevmajor, c_rdevminor, c_namesize, c_check.
        let fields = [
            inode as u32 + 1,
            member.mode,
            0,
            0,
            links,
            0,
            member.data.len() as u32,
            0,
            0,
            member.device.0,
            member.device.1,
            member.name.len() as u32 + 1,
            0,
        ];
        archive.extend_from_slice(b"070701");
        for field in fields {
            archive.extend_from_slice(format!("{field:08X}").as_bytes());
        }
        archive.extend_from_slice(member.name.as_bytes());
        archive.push(0);
        pad_to_four(&mut archive);
        archive.extend_from_slice(member.data);
        pad_to_four(&mut archive);
    }
    archive.resize(archive.len().next_multiple_of(512), 0);
    archive
}

fn pad_to_four(archive: &mut Vec<u8>) {
    archive.resize(archive.len().next_multiple_of(4), 0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_archive_holds_init_and_ends_with_the_trailer() {
        let archive = build(b"\x7fELF-agent");
        assert_eq!(&archive[..6], b"070701");
        let text = String::from_utf8_lossy(&archive);
        let init = text.find("init\0").expect("/init is in the archive");
        assert!(text[init..].contains("\x7fELF-agent"));
        assert!(text.contains("TRAILER!!!"));
        assert_eq!(archive.len() % 512, 0);
        assert_eq!(build(b"x"), build(b"x"), "the same agent gives the same bytes");
    }

    #[test]
    fn the_embedded_agent_is_an_elf_executable() {
        assert_eq!(&AGENT[..4], b"\x7fELF");
    }
}
