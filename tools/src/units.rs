//! Sizes as people read them.

/// `n` bytes in binary units: `4 KiB`, `2 MiB`, `1.5 GiB`, `512 bytes` (whole numbers
/// without decimals, others to one decimal).
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} bytes");
    }
    let mut unit = 0;
    let mut scale = 1024u64;
    while unit + 1 < UNITS.len() && n >= scale * 1024 {
        unit += 1;
        scale *= 1024;
    }
    if n % scale == 0 {
        format!("{} {}", n / scale, UNITS[unit])
    } else {
        format!("{:.1} {}", n as f64 / scale as f64, UNITS[unit])
    }
}

/// A size given on the command line: a whole number of bytes, or with a `K`, `M` or `G`
/// suffix (binary units); zero is refused.
pub fn parse_size(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let (num, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1usize << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("not a size: {s} (e.g. 512M)"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes_read_in_binary_units() {
        assert_eq!(super::bytes(0), "0 bytes");
        assert_eq!(super::bytes(4096), "4 KiB");
        assert_eq!(super::bytes(2 << 20), "2 MiB");
        assert_eq!(super::bytes(1536 << 20), "1.5 GiB");
        assert_eq!(super::bytes(1000), "1000 bytes");
        assert_eq!(super::bytes(3 << 40), "3 TiB");
    }
}
