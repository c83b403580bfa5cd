//! pager: the fault-resolution engine (regions, sources, fault loop, placement, prefetch, stats).
