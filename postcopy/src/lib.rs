//! postcopy: live post-copy migration (wire format, source page server, destination, recovery).
