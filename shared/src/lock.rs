//! The one way the workspace takes a `std::sync::Mutex`.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `mutex`, taking over a lock poisoned by a panicking holder: every mutex here guards
/// data that each holder leaves consistent at every step (maps, counters, queues), so the data
/// is still good, and refusing it would turn one panic into a panic of every later caller.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
