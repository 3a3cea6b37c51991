//! A fault-injecting [`Source`] over a real [`FileSource`] on a real file.
//!
//! Faults are set in a [`Plan`] (changeable at any time, also after the
//! shadow was opened): EIO over byte ranges, short reads, an early end of
//! data, delays, panics, EINTR, a gate that holds reads until the test opens
//! it, a one-shot hook run before a read (to modify the file mid-fill), and a
//! lying size. Every call and every delivered byte is counted per page, so a
//! test can assert that each page was read from the source exactly once.

use parking_lot::{Condvar, Mutex, RwLock};
use shadowfd::source::SourceMeta;
use shadowfd::{FileSource, Source};
use std::collections::BTreeMap;
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A callback run (once) before the first read that reaches its offset.
pub type Hook = Arc<dyn Fn() + Send + Sync>;

/// What to inject. Ranges are byte ranges of the source.
#[derive(Default, Clone)]
pub struct Plan {
    /// A read overlapping any of these fails with EIO (nothing is returned).
    pub eio: Vec<Range<u64>>,
    /// Like a disk with a bad sector: a read that starts before an `eio`
    /// range returns the bytes up to it (a short read); only a read that
    /// starts inside it fails.
    pub eio_partial: bool,
    /// A read overlapping any of these panics.
    pub panic: Vec<Range<u64>>,
    /// A read starting exactly here fails with EINTR this many times.
    pub interrupt: BTreeMap<u64, u32>,
    /// Every read returns at most this many bytes.
    pub max_read: Option<usize>,
    /// The data ends here: reads at or past it return 0 (end of file).
    pub eof_at: Option<u64>,
    /// Every read sleeps this long first.
    pub delay: Option<Duration>,
    /// Reads overlapping this range wait for the gate to open.
    pub gate: Option<(Range<u64>, Arc<Gate>)>,
    /// Run before the first read overlapping the offset, then dropped.
    pub hook: Option<(u64, Hook)>,
    /// `metadata()` reports this size instead of the file's.
    pub report_size: Option<u64>,
    /// `metadata()` panics (once set: e.g. after the shadow was opened).
    pub panic_metadata: bool,
    /// `metadata()` fails with EIO.
    pub eio_metadata: bool,
}

/// One-byte ranges at `offsets`, for [`Plan::eio`] and [`Plan::panic`].
pub fn bytes_at(offsets: &[u64]) -> Vec<Range<u64>> {
    offsets.iter().map(|&o| o..o + 1).collect()
}

/// One `read_at` call as seen by the source.
#[derive(Debug, Clone)]
pub struct ReadRec {
    pub offset: u64,
    pub len: usize,
    /// Bytes returned, or the error text.
    pub result: Result<usize, String>,
}

pub struct Injected {
    inner: FileSource,
    path: PathBuf,
    plan: RwLock<Plan>,
    log: Mutex<Vec<ReadRec>>,
    /// Page index -> bytes of that page delivered by successful reads.
    delivered: Mutex<BTreeMap<u64, u64>>,
    page: u64,
    /// The file's size at open: a page holds `min(page, size - start)` bytes.
    size_at_open: u64,
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
}

fn overlaps(r: &Range<u64>, a: u64, b: u64) -> bool {
    a < r.end && r.start < b
}

impl Injected {
    pub fn open(path: &Path, plan: Plan) -> Arc<Injected> {
        let inner = FileSource::open(path).expect("open test source");
        let size_at_open = inner.metadata().expect("stat test source").size;
        Arc::new(Injected {
            inner,
            size_at_open,
            path: path.to_path_buf(),
            plan: RwLock::new(plan),
            log: Mutex::new(Vec::new()),
            delivered: Mutex::new(BTreeMap::new()),
            page: shadowfd::page_size() as u64,
            in_flight: AtomicU64::new(0),
            max_in_flight: AtomicU64::new(0),
        })
    }

    /// A source with no faults, only counting.
    pub fn clean(path: &Path) -> Arc<Injected> {
        Injected::open(path, Plan::default())
    }

    /// Changes the plan.
    pub fn set(&self, f: impl FnOnce(&mut Plan)) {
        f(&mut self.plan.write());
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every call so far.
    pub fn log(&self) -> Vec<ReadRec> {
        self.log.lock().clone()
    }

    pub fn calls(&self) -> usize {
        self.log.lock().len()
    }

    /// Page index -> bytes of it delivered by successful reads.
    pub fn delivered(&self) -> BTreeMap<u64, u64> {
        self.delivered.lock().clone()
    }

    /// Pages of which more bytes were delivered than they hold, i.e. read
    /// more than once: (page index, bytes delivered).
    pub fn reread_pages(&self) -> Vec<(u64, u64)> {
        self.delivered
            .lock()
            .iter()
            .filter(|&(&p, &n)| {
                n > self
                    .page
                    .min(self.size_at_open.saturating_sub(p * self.page))
            })
            .map(|(&p, &n)| (p, n))
            .collect()
    }

    /// The most reads that were inside `read_at` at the same time.
    pub fn max_in_flight(&self) -> u64 {
        self.max_in_flight.load(Ordering::SeqCst)
    }

    fn record(&self, offset: u64, len: usize, result: &io::Result<usize>) {
        self.log.lock().push(ReadRec {
            offset,
            len,
            result: match result {
                Ok(n) => Ok(*n),
                Err(e) => Err(e.to_string()),
            },
        });
        if let Ok(n) = result {
            let (mut a, b) = (offset, offset + *n as u64);
            let mut d = self.delivered.lock();
            while a < b {
                let p = a / self.page;
                let e = b.min((p + 1) * self.page);
                *d.entry(p).or_insert(0) += e - a;
                a = e;
            }
        }
    }

    fn read_inner(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let end = offset + buf.len() as u64;
        let (gate, hook, delay) = {
            let mut plan = self.plan.write();
            let gate = plan
                .gate
                .as_ref()
                .filter(|(r, _)| overlaps(r, offset, end))
                .map(|(_, g)| g.clone());
            let hook = match &plan.hook {
                Some((at, _)) if (offset..end).contains(at) => plan.hook.take().map(|(_, h)| h),
                _ => None,
            };
            (gate, hook, plan.delay)
        };
        if let Some(g) = gate {
            g.pass();
        }
        if let Some(h) = hook {
            h();
        }
        if let Some(d) = delay {
            std::thread::sleep(d);
        }
        let mut len = buf.len();
        {
            let mut plan = self.plan.write();
            if plan.panic.iter().any(|r| overlaps(r, offset, end)) {
                drop(plan);
                self.log.lock().push(ReadRec {
                    offset,
                    len,
                    result: Err("panicked".into()),
                });
                panic!("injected panic in read_at({offset}, {len})");
            }
            for r in plan.eio.iter().filter(|r| overlaps(r, offset, end)) {
                if plan.eio_partial && offset < r.start {
                    len = len.min((r.start - offset) as usize);
                } else {
                    return Err(io::Error::from_raw_os_error(libc::EIO));
                }
            }
            if let Some(n) = plan.interrupt.get_mut(&offset) {
                if *n > 0 {
                    *n -= 1;
                    return Err(io::Error::from_raw_os_error(libc::EINTR));
                }
            }
            if let Some(m) = plan.max_read {
                len = len.min(m);
            }
            if let Some(eof) = plan.eof_at {
                if offset >= eof {
                    return Ok(0);
                }
                len = len.min((eof - offset) as usize);
            }
        }
        self.inner.read_at(&mut buf[..len], offset)
    }
}

struct InFlight<'a>(&'a AtomicU64);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Source for Injected {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        let _guard = InFlight(&self.in_flight);
        let len = buf.len();
        let r = self.read_inner(buf, offset);
        self.record(offset, len, &r);
        r
    }

    fn metadata(&self) -> io::Result<SourceMeta> {
        let (panics, fails, size) = {
            let p = self.plan.read();
            (p.panic_metadata, p.eio_metadata, p.report_size)
        };
        if panics {
            panic!("injected panic in metadata()");
        }
        if fails {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        let mut m = self.inner.metadata()?;
        if let Some(s) = size {
            m.size = s;
        }
        Ok(m)
    }

    fn name(&self) -> String {
        format!("{} (injected)", self.path.display())
    }

    /// The file's own identity: a working set recorded through one
    /// `Injected` of a file is replayed through another.
    fn identity(&self) -> Option<shadowfd::SourceIdentity> {
        self.inner.identity()
    }
}

/// A gate that holds reads until opened, and counts who arrived.
#[derive(Default)]
pub struct Gate {
    state: Mutex<(bool, u32)>,
    cv: Condvar,
}

impl Gate {
    pub fn new() -> Arc<Gate> {
        Arc::new(Gate::default())
    }

    fn pass(&self) {
        let mut s = self.state.lock();
        s.1 += 1;
        self.cv.notify_all();
        while !s.0 {
            self.cv.wait(&mut s);
        }
    }

    /// Waits until at least `n` reads are held (or were held); false on timeout.
    pub fn wait_arrivals(&self, n: u32, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut s = self.state.lock();
        while s.1 < n {
            if self.cv.wait_until(&mut s, deadline).timed_out() {
                return s.1 >= n;
            }
        }
        true
    }

    pub fn arrivals(&self) -> u32 {
        self.state.lock().1
    }

    pub fn open(&self) {
        self.state.lock().0 = true;
        self.cv.notify_all();
    }
}
