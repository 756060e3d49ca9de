//! A kill that cannot land: SIGKILL pending on a task that stays alive. The kernel delivers
//! SIGKILL as soon as the task runs again, so a task that keeps it pending is one that does
//! not run: in D (an uninterruptible wait) or frozen. This holds whatever sent the kill
//! (dockerd, containerd, CRI-O, kubelet through any of them, a human).

/// SIGKILL is signal 9: bit 8 of the pending masks.
const SIGKILL_MASK: u64 = 1 << 8;

/// Whether `/proc/<pid>/task/<tid>/status` shows SIGKILL pending, for the thread (`SigPnd`)
/// or for its whole process (`ShdPnd`). None when neither line is there or readable.
pub fn sigkill_pending(status: &str) -> Option<bool> {
    let mut seen = false;
    for line in status.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        if key != "SigPnd" && key != "ShdPnd" {
            continue;
        }
        let Ok(mask) = u64::from_str_radix(value.trim(), 16) else {
            continue;
        };
        if mask & SIGKILL_MASK != 0 {
            return Some(true);
        }
        seen = true;
    }
    seen.then_some(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A container's `dd` in D on `submit_bio_wait` after `docker stop` (issue 12).
    const KILLED_IN_D: &str = "Name:\tdd\nUmask:\t0022\nState:\tD (disk sleep)\nTgid:\t4711\n\
        Pid:\t4711\nSigQ:\t1/63422\nSigPnd:\t0000000000000100\nShdPnd:\t0000000000000100\n\
        SigBlk:\t0000000000000000\nSigIgn:\t0000000000000000\nSigCgt:\t0000000000000000\n";
    /// A frozen thread whose process, not the thread, has SIGKILL (and SIGTERM) pending.
    const SHARED_ONLY: &str = "Name:\tapp\nState:\tD (disk sleep)\nSigPnd:\t0000000000000000\n\
        ShdPnd:\t0000000000004100\nSigBlk:\t0000000000000000\n";
    /// SIGTERM pending (bit 14) and SIGKILL blocked: blocking SIGKILL is impossible, the
    /// blocked mask says nothing about delivery.
    const TERM_ONLY: &str = "State:\tS (sleeping)\nSigPnd:\t0000000000004000\n\
        ShdPnd:\t0000000000000000\nSigBlk:\t0000000000000100\n";

    #[test]
    fn sigkill_pending_on_the_thread_or_its_process() {
        assert_eq!(sigkill_pending(KILLED_IN_D), Some(true));
        assert_eq!(sigkill_pending(SHARED_ONLY), Some(true));
    }

    #[test]
    fn other_signals_pending_or_blocked_are_not_a_kill() {
        assert_eq!(sigkill_pending(TERM_ONLY), Some(false));
    }

    #[test]
    fn a_status_without_usable_masks_says_nothing() {
        assert_eq!(sigkill_pending(""), None);
        assert_eq!(sigkill_pending("Name:\tx\nSigPnd:\tnot-hex\n"), None);
        assert_eq!(sigkill_pending("SigPnd 0000000000000100"), None);
        assert_eq!(
            sigkill_pending("SigPnd:\t00000000000001000000000000000000\n"),
            None,
            "wider than 64 bits: not a mask this kernel writes"
        );
    }
}
