//! The status document: the server, its limits, its clients and every
//! shared shadow, as JSON.

use super::*;
use crate::remote::wire::json_str;

pub(super) fn json_opt(v: Option<f64>) -> String {
    v.map_or("null".into(), |x| format!("{x:.1}"))
}

pub(super) fn entry_json(e: &Entry) -> String {
    let s = e.stats();
    let remote = e.attached.load(Ordering::Relaxed);
    format!(
        "{{\"id\":{},\"name\":{},\"size\":{},\"mode\":{},\"handles\":{},\"lazy_mappings\":{remote},\"resident_bytes\":{},\"faults\":{},\"chunks_filled\":{},\"bytes_filled\":{},\"readahead_chunks\":{},\"errors\":{},\"poisoned_pages\":{},\"budget_refusals\":{},\"fill_p50_us\":{},\"fill_p99_us\":{},\"source_changed\":{},\"last_error\":{}{}}}",
        e.id,
        json_str(e.name()),
        e.size(),
        json_str(e.mode()),
        e.users.load(Ordering::Relaxed),
        e.resident(),
        s.faults,
        s.chunks_filled,
        s.bytes_filled,
        s.readahead_chunks,
        s.errors,
        s.poisoned_pages,
        s.budget_refusals,
        json_opt(s.fill_p50_us),
        json_opt(s.fill_p99_us),
        s.source_changed,
        s.last_error.as_deref().map_or("null".to_string(), json_str),
        tree::source_json(e.meta()),
    )
}

impl Inner {
    pub(super) fn status_json(&self) -> String {
        let st = self.state.lock();
        let now = Instant::now();
        let clients: Vec<String> = st
            .clients
            .iter()
            .map(|(id, c)| {
                format!(
                    "{{\"id\":{id},\"pid\":{},\"uid\":{},\"userfaultfd\":{},\"handles\":{},\"lazy_mappings\":{},\"connected_s\":{:.1}}}",
                    c.pid,
                    c.uid,
                    c.uffd,
                    c.handles,
                    c.mappings,
                    now.duration_since(c.since).as_secs_f64()
                )
            })
            .collect();
        let mut entries: Vec<&Arc<Entry>> = st.entries.values().collect();
        if let TreeImpl::Single(e) = &self.tree {
            entries.push(e);
        }
        entries.sort_by_key(|e| e.id);
        let shadows: Vec<String> = entries.iter().map(|e| entry_json(e)).collect();
        let resident: u64 = entries.iter().map(|e| e.resident()).sum();
        let (budget, max_size, mode) = match &self.engine {
            Some(e) => (
                e.config().memory_budget,
                e.config().max_size,
                if e.mode() == crate::Mode::Lazy {
                    "lazy"
                } else {
                    "eager"
                },
            ),
            None => (0, 0, "single"),
        };
        let tree = match &self.tree {
            TreeImpl::Tree(t) => t.kind(),
            TreeImpl::Single(_) => "single",
        };
        format!(
            "{{\"version\":{},\"pid\":{},\"uptime_s\":{:.1},\"tree\":{},\"mode\":{},\"memory_budget\":{budget},\"max_size\":{max_size},\"resident_bytes\":{resident},\"peer_timeout_ms\":{},\"pending\":{},\"lazy_ranges\":{},\"limits\":{{\"max_clients\":{},\"max_pending\":{},\"max_handles\":{},\"max_ranges\":{},\"max_ranges_total\":{}}},\"clients\":[{}],\"shadows\":[{}]}}",
            wire::VERSION,
            std::process::id(),
            self.started.elapsed().as_secs_f64(),
            json_str(tree),
            json_str(mode),
            self.opts.peer_timeout.as_millis(),
            st.pending.len(),
            self.ranges_total.load(Ordering::Relaxed),
            self.opts.max_clients,
            self.opts.max_pending,
            self.opts.max_handles,
            self.opts.max_ranges,
            self.opts.max_ranges_total,
            clients.join(","),
            shadows.join(",")
        )
    }
}
