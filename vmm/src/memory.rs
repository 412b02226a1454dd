//! Guest RAM: one anonymous mapping registered as KVM memory slot 0 with dirty logging, plus a
//! record of the pages the host itself wrote (KVM's dirty log only sees guest writes).

use kvm_bindings::{KVM_MEM_LOG_DIRTY_PAGES, kvm_userspace_memory_region};
use kvm_ioctls::VmFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, VolatileSlice};

use crate::error::{Error, Result};
use crate::layout::PAGE_SIZE;

/// The one memory slot nmifuzz uses.
const SLOT: u32 = 0;

/// Guest RAM starting at guest physical address 0.
pub struct GuestRam {
    mem: GuestMemoryMmap<()>,
    size: u64,
    /// One bit per page the host wrote since the last [`GuestRam::take_dirty_pages`].
    host_written: Vec<u64>,
}

impl GuestRam {
    /// Maps `size` bytes of zeroed memory, all of it resident, and registers them with `vm`
    /// with dirty logging on.
    pub fn new(vm: &VmFd, size: u64) -> Result<Self> {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size as usize)])
            .map_err(|e| Error::Memory(format!("cannot map {size:#x} bytes: {e}")))?;
        // Every page is made resident now rather than when the guest first touches it: a run
        // that reaches pages no run reached before (a hostile guest running through data or
        // scribbling page tables) then costs no host page faults, and the process's resident
        // memory stays what it was at boot, so that any growth of it is the VMM's own.
        for page in (0..size).step_by(PAGE_SIZE as usize) {
            mem.write_obj(0u8, GuestAddress(page)).map_err(|e| Error::Memory(e.to_string()))?;
        }
        let host =
            mem.get_host_address(GuestAddress(0)).map_err(|e| Error::Memory(e.to_string()))?;
        let region = kvm_userspace_memory_region {
            slot: SLOT,
            flags: KVM_MEM_LOG_DIRTY_PAGES,
            guest_phys_addr: 0,
            memory_size: size,
            userspace_addr: host as u64,
        };
        // SAFETY: the region describes `size` bytes of a mapping owned by `mem`, which lives in
        // the returned `GuestRam`; `Vm` drops the VM fd before it drops this memory.
        unsafe { vm.set_user_memory_region(region) }
            .map_err(Error::kvm("KVM_SET_USER_MEMORY_REGION"))?;
        let pages = size / PAGE_SIZE;
        Ok(Self { mem, size, host_written: vec![0; pages.div_ceil(64) as usize] })
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The mapping, for the ELF loader.
    pub fn mmap(&self) -> &GuestMemoryMmap<()> {
        &self.mem
    }

    fn check(&self, addr: u64, len: usize) -> Result<()> {
        match addr.checked_add(len as u64) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(Error::Memory(format!(
                "access of {len:#x} bytes at {addr:#x} is outside guest memory (size {:#x})",
                self.size
            ))),
        }
    }

    /// Copies guest memory at `addr` into `buf`.
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<()> {
        self.check(addr, buf.len())?;
        self.mem.read_slice(buf, GuestAddress(addr)).map_err(|e| Error::Memory(e.to_string()))
    }

    /// Reads a little-endian u64.
    pub fn read_u64(&self, addr: u64) -> Result<u64> {
        let mut b = [0; 8];
        self.read(addr, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// The guest physical address `virtual_address` maps to under the 4-level page tables at
    /// `cr3` (4 KiB, 2 MiB and 1 GiB pages; SDM vol. 3, 4.5), if it is mapped. Access rights
    /// are not checked: the VMM reads what the guest's kernel can.
    pub fn translate(&self, cr3: u64, virtual_address: u64) -> Option<u64> {
        self.translate_with_levels(cr3, virtual_address, 4)
    }

    /// [`GuestRam::translate`] with 4 or 5 levels of page tables (CR4.LA57, which a real
    /// kernel turns on where the CPU has it).
    pub fn translate_with_levels(
        &self,
        cr3: u64,
        virtual_address: u64,
        levels: u32,
    ) -> Option<u64> {
        /// Bits 51:12 of an entry: the next table's or the page's frame.
        const FRAME: u64 = 0x000f_ffff_ffff_f000;
        const PRESENT: u64 = 1;
        const LARGE: u64 = 1 << 7;
        let mut table = cr3 & FRAME;
        for level in (0..levels).rev() {
            let shift = 12 + 9 * level;
            let index = (virtual_address >> shift) & 0x1ff;
            let entry = self.read_u64(table + 8 * index).ok()?;
            if entry & PRESENT == 0 {
                return None;
            }
            // A large page at the PDPT (1 GiB) or PD (2 MiB) level ends the walk.
            let offset_mask = (1u64 << shift) - 1;
            if level == 0 || (entry & LARGE != 0 && level < 3) {
                return Some((entry & FRAME & !offset_mask) | (virtual_address & offset_mask));
            }
            table = entry & FRAME;
        }
        None
    }

    /// Writes `data` at `addr` and remembers the pages for the next reset.
    pub fn write(&mut self, addr: u64, data: &[u8]) -> Result<()> {
        self.check(addr, data.len())?;
        self.mem.write_slice(data, GuestAddress(addr)).map_err(|e| Error::Memory(e.to_string()))?;
        if !data.is_empty() {
            for page in addr / PAGE_SIZE..=(addr + data.len() as u64 - 1) / PAGE_SIZE {
                self.host_written[(page / 64) as usize] |= 1 << (page % 64);
            }
        }
        Ok(())
    }

    /// Writes a little-endian u64.
    pub fn write_u64(&mut self, addr: u64, value: u64) -> Result<()> {
        self.write(addr, &value.to_le_bytes())
    }

    /// Zeroes `len` bytes at `addr`.
    pub fn zero(&mut self, addr: u64, len: u64) -> Result<()> {
        const CHUNK: [u8; PAGE_SIZE as usize] = [0; PAGE_SIZE as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(PAGE_SIZE);
            self.write(addr + done, &CHUNK[..n as usize])?;
            done += n;
        }
        Ok(())
    }

    /// A copy of all of guest memory.
    pub fn copy_all(&self) -> Result<Vec<u8>> {
        let mut all = vec![0; self.size as usize];
        self.read(0, &mut all)?;
        Ok(all)
    }

    /// Returns the pages written since the last call, by the guest (KVM's dirty log, which this
    /// call clears) or by the host, as a bitmap of one bit per page.
    pub fn take_dirty_pages(&mut self, vm: &VmFd) -> Result<Vec<u64>> {
        let mut dirty =
            vm.get_dirty_log(SLOT, self.size as usize).map_err(Error::kvm("KVM_GET_DIRTY_LOG"))?;
        for (d, h) in dirty.iter_mut().zip(self.host_written.iter_mut()) {
            *d |= std::mem::take(h);
        }
        Ok(dirty)
    }

    /// Copies back from `image`, a full copy of guest memory, every page written since the last
    /// [`GuestRam::take_dirty_pages`]; returns how many.
    pub fn restore_dirty_pages(&mut self, vm: &VmFd, image: &[u8]) -> Result<usize> {
        let dirty = self.take_dirty_pages(vm)?;
        let mut pages = 0;
        for (word_index, mut word) in dirty.into_iter().enumerate() {
            while word != 0 {
                let bit = word.trailing_zeros() as u64;
                word &= word - 1;
                self.restore_page(word_index as u64 * 64 + bit, image)?;
                pages += 1;
            }
        }
        Ok(pages)
    }

    /// Copies page `page` back from `image`, a full copy of guest memory, without marking it
    /// as host-written: it is being restored, not changed.
    fn restore_page(&self, page: u64, image: &[u8]) -> Result<()> {
        let start = page * PAGE_SIZE;
        let src = image
            .get(start as usize..(start + PAGE_SIZE) as usize)
            .ok_or_else(|| Error::Memory(format!("page {page:#x} is outside the snapshot")))?;
        let dst: VolatileSlice<'_, _> = self
            .mem
            .get_slice(GuestAddress(start), PAGE_SIZE as usize)
            .map_err(|e| Error::Memory(e.to_string()))?;
        dst.copy_from(src);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accesses_outside_memory_are_errors() {
        let kvm = kvm_ioctls::Kvm::new().expect("these tests need /dev/kvm");
        let vm = kvm.create_vm().unwrap();
        let mut ram = GuestRam::new(&vm, 4 << 20).unwrap();
        assert!(ram.write(4 << 20, &[1]).is_err());
        assert!(ram.read(u64::MAX - 2, &mut [0; 8]).is_err());
        ram.write((4 << 20) - 8, &[7; 8]).unwrap();
        assert_eq!(ram.read_u64((4 << 20) - 8).unwrap(), 0x0707_0707_0707_0707);
    }

    #[test]
    fn host_writes_show_up_as_dirty_pages_once() {
        let kvm = kvm_ioctls::Kvm::new().expect("these tests need /dev/kvm");
        let vm = kvm.create_vm().unwrap();
        let mut ram = GuestRam::new(&vm, 4 << 20).unwrap();
        // A write that straddles pages 2 and 3, and one in page 64 (second bitmap word).
        ram.write(3 * PAGE_SIZE - 4, &[0xaa; 8]).unwrap();
        ram.write_u64(64 * PAGE_SIZE, 1).unwrap();
        let dirty = ram.take_dirty_pages(&vm).unwrap();
        assert_eq!(dirty[0], 0b1100);
        assert_eq!(dirty[1], 1);
        assert!(ram.take_dirty_pages(&vm).unwrap().iter().all(|w| *w == 0));
    }
}
