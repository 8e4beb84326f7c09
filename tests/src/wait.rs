use std::time::{Duration, Instant};

/// Poll `cond` every 20 ms until it is true (returns true) or `timeout`
/// passes (returns false). Use generous timeouts: the machine is shared.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    wait_for(timeout, || cond().then_some(())).is_some()
}

/// Poll `f` until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Wait on a condition variable until `f(state)` returns `Some` or `timeout`
/// passes; what the MQTT test clients use to wait for their own events.
pub(crate) fn wait_on<S, T>(
    shared: &(std::sync::Mutex<S>, std::sync::Condvar),
    timeout: Duration,
    mut f: impl FnMut(&S) -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + timeout;
    let (lock, cvar) = shared;
    let mut st = lock.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        if let Some(v) = f(&st) {
            return Some(v);
        }
        let now = Instant::now();
        if now >= deadline {
            return None;
        }
        st = cvar
            .wait_timeout(st, deadline - now)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
}
