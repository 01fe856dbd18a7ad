//! Log lines that a misbehaving plugin could repeat without limit (its panics): the
//! first of a kind is logged, repeats of that kind within [`INTERVAL`] are counted, and
//! one line sums them up when the interval ends.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long repeats of one kind are counted before their summary line.
pub const INTERVAL: Duration = Duration::from_secs(5);

/// Kinds of line with an interval running, and what was counted in it.
#[derive(Debug)]
pub struct Repeats<K> {
    windows: Mutex<HashMap<K, Counted>>,
}

#[derive(Debug, Default)]
struct Counted {
    count: u64,
    last: String,
}

impl<K> Default for Repeats<K> {
    fn default() -> Self {
        Repeats {
            windows: Mutex::default(),
        }
    }
}

impl<K: Eq + Hash + Clone + Send + 'static> Repeats<K> {
    /// Whether to log this occurrence of `key` now: yes for the first of an interval,
    /// which starts the interval. A repeat is counted instead (`last` is kept as the
    /// text of the last one), and `summary(count, last)` runs once when the interval
    /// ends, if anything was counted. Without a runtime to end the interval, every
    /// occurrence is logged.
    pub fn first(
        self: &Arc<Self>,
        key: K,
        last: impl FnOnce() -> String,
        summary: impl FnOnce(u64, &str) + Send + 'static,
    ) -> bool {
        let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(counted) = windows.get_mut(&key) {
            counted.count += 1;
            counted.last = last();
            return false;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return true;
        };
        windows.insert(key.clone(), Counted::default());
        let this = self.clone();
        runtime.spawn(async move {
            tokio::time::sleep(INTERVAL).await;
            let counted = this
                .windows
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&key);
            if let Some(counted) = counted.filter(|c| c.count > 0) {
                summary(counted.count, &counted.last);
            }
        });
        true
    }
}
