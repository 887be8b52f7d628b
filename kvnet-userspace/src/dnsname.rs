//! DNS names as kvnet's DHCP, DNS and config accept them (kept apart so the
//! config model checks them without reaching up into the servers).

/// A hostname as DHCP and DNS use it: one label of letters, digits and
/// hyphens, 1-63 characters, not starting or ending with a hyphen.
pub fn valid_hostname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// A domain: dot-separated valid labels, at most 253 characters.
pub fn valid_domain(d: &str) -> bool {
    let d = d.strip_suffix('.').unwrap_or(d);
    !d.is_empty() && d.len() <= 253 && d.split('.').all(valid_hostname)
}
