//! A check of a DHCP message's option lengths before `dhcproto` decodes it.
//!
//! `dhcproto` (0.15) trusts the length byte of a few options: it asserts it in debug builds
//! (`debug_assert!`), or subtracts from it, which underflows. A client can therefore crash a
//! debug build (the tests run one) with a three-byte option, and in a release build the wrapped
//! length only fails the decode later. Walking the options first and refusing those lengths
//! makes the message malformed (dropped and counted) in every build.

/// The options whose length `dhcproto` takes on trust: code, shortest, longest.
const TRUSTED_LENGTHS: [(u8, usize, usize); 8] = [
    (80, 0, 0),           // Rapid Commit: empty.
    (81, 3, usize::MAX),  // Client FQDN: flags and two rcodes, then the name.
    (94, 3, 3),           // Client Network Interface Identifier.
    (151, 1, usize::MAX), // Bulk leasequery status code: the code, then a message.
    (152, 4, 4),          // Bulk leasequery base time.
    (153, 4, 4),          // Bulk leasequery start time of state.
    (154, 4, 4),          // Bulk leasequery query start time.
    (155, 4, 4),          // Bulk leasequery query end time.
];

/// Where the options start: the fixed BOOTP header (236 bytes) and the magic cookie.
const OPTIONS_AT: usize = 240;

/// `Err` names the first option of `message` (a UDP payload) whose length `dhcproto` would
/// trust and that is out of its bounds. `dhcproto` joins consecutive instances of one option
/// (RFC 3396 long options) and decodes them as one value, so the length checked is the sum of
/// such a run. Everything else (a truncated message, an unknown option) is left to the decoder.
pub(crate) fn check_option_lengths(message: &[u8]) -> Result<(), String> {
    let mut rest = message.get(OPTIONS_AT..).unwrap_or_default();
    // The option being read: its code and the length of its instances so far.
    let mut run: Option<(u8, usize)> = None;
    while let Some((&code, after)) = rest.split_first() {
        match code {
            0 => {
                check_run(run.take())?;
                rest = after;
                continue;
            }
            255 => break,
            _ => {}
        }
        let Some((&len, value)) = after.split_first() else {
            break;
        };
        run = match run {
            Some((c, total)) if c == code => Some((c, total + usize::from(len))),
            other => {
                check_run(other)?;
                Some((code, usize::from(len)))
            }
        };
        rest = value.get(usize::from(len)..).unwrap_or_default();
    }
    check_run(run)
}

/// Checks the length of one option (all its consecutive instances) against [`TRUSTED_LENGTHS`].
fn check_run(run: Option<(u8, usize)>) -> Result<(), String> {
    let Some((code, len)) = run else {
        return Ok(());
    };
    if let Some(&(_, min, max)) = TRUSTED_LENGTHS.iter().find(|(c, ..)| *c == code) {
        if len < min || len > max {
            let bounds = if max == usize::MAX {
                format!("at least {min}")
            } else {
                format!("{min} to {max}")
            };
            return Err(format!(
                "option {code} is {len} bytes long; it must be {bounds}"
            ));
        }
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

    /// Found by the `frames` fuzz target (fuzz/): two consecutive 4-byte options 155, each
    /// within bounds, which dhcproto joins into one 8-byte value and asserts the length of (a
    /// debug-build panic, "assertion failed: len == 4"). Minimised input: one DHCP message from
    /// a client with options 155 (4 bytes) and 155 (4 bytes).
    #[test]
    fn fuzz_regression_repeated_option_is_checked_whole() {
        let options = [
            53, 1, 1, 155, 4, 155, 155, 155, 155, 155, 4, 155, 155, 214, 0, 255,
        ];
        // Through the core (a debug-build panic before): dropped as malformed.
        let mut host = crate::core::testkit::host(crate::core::testkit::settings());
        let frame = crate::core::testkit::dhcp_payload_frame(&message(&options));
        host.handle_frame(crate::core::testkit::t(0), &frame);
        assert_eq!(host.counters().malformed, 1);
        let err = check_option_lengths(&message(&options)).unwrap_err();
        assert_eq!(err, "option 155 is 8 bytes long; it must be 4 to 4");
        // Instances split by another option, or a pad, are separate options.
        assert!(
            check_option_lengths(&message(&[155, 4, 0, 0, 0, 0, 0, 155, 4, 0, 0, 0, 0, 255]))
                .is_ok()
        );
        assert!(check_option_lengths(&message(&[
            155, 4, 0, 0, 0, 0, 53, 1, 1, 155, 4, 0, 0, 0, 0, 255
        ]))
        .is_ok());
        // A long Client FQDN in two parts is fine, and a Rapid Commit repeated is still empty.
        assert!(
            check_option_lengths(&message(&[81, 3, 0, 0, 0, 81, 5, 1, b'a', 0, 0, 0, 255])).is_ok()
        );
        assert!(check_option_lengths(&message(&[80, 0, 80, 0, 255])).is_ok());
    }
}
