//! page-state: the lock-free 2-bit page state map.
