//! A check of a DHCP message's option lengths before `dhcproto` decodes it.
//!
//! `dhcproto` (0.15) trusts the length byte of a few options: it asserts it in debug builds
//! (`debug_assert!`), or subtracts from it, which underflows. A client can therefore crash a
//! debug build (the tests run one) with a three-byte option, and in a release build the wrapped
//! length only fails the decode later. Walking the options first and refusing those lengths
//! makes the message malformed (dropped and counted) in every build.

/// The options whose length `dhcproto` takes on trust: code, shortest, longest.
const TRUSTED_LENGTHS: [(u8, u8, u8); 8] = [
    (80, 0, 0),    // Rapid Commit: empty.
    (81, 3, 255),  // Client FQDN: flags and two rcodes, then the name.
    (94, 3, 3),    // Client Network Interface Identifier.
    (151, 1, 255), // Bulk leasequery status code: the code, then a message.
    (152, 4, 4),   // Bulk leasequery base time.
    (153, 4, 4),   // Bulk leasequery start time of state.
    (154, 4, 4),   // Bulk leasequery query start time.
    (155, 4, 4),   // Bulk leasequery query end time.
];

/// Where the options start: the fixed BOOTP header (236 bytes) and the magic cookie.
const OPTIONS_AT: usize = 240;

/// `Err` names the first option of `message` (a UDP payload) whose length `dhcproto` would
/// trust and that is out of its bounds. Everything else (a truncated message, an unknown
/// option) is left to the decoder.
pub(crate) fn check_option_lengths(message: &[u8]) -> Result<(), String> {
    let mut rest = message.get(OPTIONS_AT..).unwrap_or_default();
    while let Some((&code, after)) = rest.split_first() {
        match code {
            0 => {
                rest = after;
                continue;
            }
            255 => break,
            _ => {}
        }
        let Some((&len, value)) = after.split_first() else {
            break;
        };
        if let Some(&(_, min, max)) = TRUSTED_LENGTHS.iter().find(|(c, ..)| *c == code) {
            if len < min || len > max {
                return Err(format!(
                    "option {code} is {len} bytes long; it must be {min} to {max}"
                ));
            }
        }
        rest = value.get(usize::from(len)..).unwrap_or_default();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(options: &[u8]) -> Vec<u8> {
        let mut m = vec![0u8; OPTIONS_AT];
        m[236..240].copy_from_slice(&[99, 130, 83, 99]);
        m.extend_from_slice(options);
        m
    }

    #[test]
    fn lengths_dhcproto_trusts_are_checked() {
        assert!(check_option_lengths(&message(&[53, 1, 1, 80, 0, 255])).is_ok());
        assert!(check_option_lengths(&message(&[53, 1, 1, 0, 0, 81, 3, 0, 0, 0, 255])).is_ok());
        let err = check_option_lengths(&message(&[53, 1, 1, 80, 1, 0, 255])).unwrap_err();
        assert_eq!(err, "option 80 is 1 bytes long; it must be 0 to 0");
        assert!(check_option_lengths(&message(&[81, 2, 0, 0, 255])).is_err());
        assert!(check_option_lengths(&message(&[151, 0, 255])).is_err());
        assert!(check_option_lengths(&message(&[152, 3, 0, 0, 0, 255])).is_err());
        // Past the end option, and in a truncated message, nothing is read.
        assert!(check_option_lengths(&message(&[255, 80, 1, 0])).is_ok());
        assert!(check_option_lengths(&message(&[53, 200, 1])).is_ok());
        assert!(check_option_lengths(&[1, 2, 3]).is_ok());
    }
}
