//! Reading a hash map in batches (`BPF_MAP_LOOKUP_BATCH`), which aya does
//! not wrap: one syscall per few thousand entries instead of two per entry
//! (`get_next_key` + `lookup`), and a cursor that survives deletions made
//! meanwhile, so a walk can pause between batches.

use std::os::fd::{AsRawFd, BorrowedFd};

use anyhow::{bail, Result};

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Where the next batch starts (a hash map's bucket index).
#[derive(Debug, Default, Clone, Copy)]
pub struct Cursor {
    next: Option<u32>,
    done: bool,
}

impl Cursor {
    pub fn done(&self) -> bool {
        self.done
    }
}

/// Appends up to `max` entries of the hash map `fd` (key type K, value type
/// V, as the map was defined) from `cursor` to `out`; marks the cursor done
/// after the last bucket.
pub fn lookup<K: aya::Pod + bytemuck::Zeroable, V: aya::Pod + bytemuck::Zeroable>(
    fd: BorrowedFd<'_>,
    cursor: &mut Cursor,
    max: u32,
    out: &mut Vec<(K, V)>,
) -> Result<()> {
    if cursor.done {
        return Ok(());
    }
    let mut want = max.max(1);
    loop {
        let mut keys: Vec<K> = vec![K::zeroed(); want as usize];
        let mut values: Vec<V> = vec![V::zeroed(); want as usize];
        let in_batch = cursor.next.unwrap_or(0);
        let mut out_batch: u32 = 0;
        let mut attr = BatchAttr {
            in_batch: if cursor.next.is_some() {
                &in_batch as *const u32 as u64
            } else {
                0
            },
            out_batch: &mut out_batch as *mut u32 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: want,
            map_fd: fd.as_raw_fd() as u32,
            ..Default::default()
        };
        // SAFETY: the attribute points at live buffers of `count` keys and
        // values of the map's own key and value sizes.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &mut attr as *mut BatchAttr,
                std::mem::size_of::<BatchAttr>() as u32,
            )
        };
        let err = (rc < 0).then(std::io::Error::last_os_error);
        match err.as_ref().and_then(|e| e.raw_os_error()) {
            // One bucket holds more entries than asked for: ask for more.
            Some(libc::ENOSPC) if want < 1 << 20 => {
                want *= 2;
                continue;
            }
            None | Some(libc::ENOENT) => {}
            Some(_) => bail!(
                "reading a BPF map in batches: {}",
                err.map(|e| e.to_string()).unwrap_or_default()
            ),
        }
        let n = attr.count.min(want) as usize;
        out.extend(keys.into_iter().zip(values).take(n));
        cursor.next = Some(out_batch);
        cursor.done = err.is_some();
        return Ok(());
    }
}
