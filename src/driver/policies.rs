//! The policies beside the gateway's loop: the [`PolicyThread`] that runs the WASM modules,
//! joined to the core's two hooks. Sessions: the core's [`SessionPolicy`] is the
//! [`PolicyClient`] itself (it answers "later" and the verdict comes back as a
//! [`PolicyResponse::Verdict`]). DHCP: [`DhcpBridge`] turns the core's reply into the policy's
//! terms and keeps what it showed, so that the answer can be turned back into the changes the
//! core applies.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use super::handle::Reply;
use super::HandleError;
use crate::core::dhcp::{
    DhcpAnswer, DhcpChanges, DhcpClientInfo, DhcpDecision, DhcpPolicy, DhcpReplyInfo, DhcpTicket,
};
use crate::policy::{
    DhcpOutcome, DhcpRequestId, PolicyClient, PolicyResponse, PolicyThread, ReloadReport,
    RESERVED_OPTIONS,
};

/// The replies shown to the policies, by request, until their answer comes.
pub(super) type Shown = Rc<RefCell<HashMap<u64, DhcpReplyInfo>>>;

/// The running policies: the way to their thread and its answers.
pub(super) struct Policies {
    pub(super) client: PolicyClient,
    pub(super) responses: async_channel::Receiver<PolicyResponse>,
    pub(super) shown: Shown,
    /// Reloads under way, by id: who asked (for the security log) and where the report goes.
    pub(super) reloads: HashMap<u64, (String, Reply<Result<ReloadReport, HandleError>>)>,
    /// The id of the last reload asked for.
    pub(super) next_reload: u64,
    /// Held: the thread serves as long as the gateway runs.
    pub(super) _thread: PolicyThread,
}

/// The core's DHCP hook, answered by the policy thread.
pub(super) struct DhcpBridge {
    pub(super) client: PolicyClient,
    pub(super) shown: Shown,
}

impl DhcpPolicy for DhcpBridge {
    fn customize(
        &mut self,
        ticket: DhcpTicket,
        client: &DhcpClientInfo,
        reply: &DhcpReplyInfo,
    ) -> DhcpAnswer {
        if !self.client.customizes_dhcp() {
            return DhcpAnswer::Decided(DhcpDecision::Unchanged, None);
        }
        match self
            .client
            .customize_dhcp(DhcpRequestId(ticket.0), client.clone(), reply.clone())
        {
            Ok(()) => {
                self.shown.borrow_mut().insert(ticket.0, reply.clone());
                DhcpAnswer::Later
            }
            // The policy thread is swamped or gone: the reply goes as built (DHCP keeps working).
            Err(_) => DhcpAnswer::Decided(DhcpDecision::Unchanged, Some("policy-queue".into())),
        }
    }
}

/// The core's decision for the policies' `outcome` about the reply `shown`.
pub(super) fn dhcp_decision(
    shown: &DhcpReplyInfo,
    outcome: DhcpOutcome,
) -> (DhcpDecision, Option<String>) {
    let reply = match outcome {
        DhcpOutcome::NoReply { by } => return (DhcpDecision::NoReply, Some(by)),
        DhcpOutcome::Reply(reply) => reply,
    };
    let new: Vec<(u8, Vec<u8>)> = reply
        .options
        .into_iter()
        .filter(|o| !RESERVED_OPTIONS.contains(&o.code))
        .map(|o| (o.code, o.value))
        .collect();
    let set_options: Vec<(u8, Vec<u8>)> = new
        .iter()
        .filter(|(code, value)| {
            !shown
                .options
                .iter()
                .any(|o| o.code == *code && o.value == *value)
        })
        .cloned()
        .collect();
    let remove_options: Vec<u8> = shown
        .options
        .iter()
        .map(|o| o.code)
        .filter(|code| !RESERVED_OPTIONS.contains(code) && !new.iter().any(|(c, _)| c == code))
        .collect();
    // A lease time of 0 would end the binding as it starts: keep the server's.
    let lease_seconds = reply
        .lease_seconds
        .filter(|s| *s > 0 && Some(*s) != shown.lease_seconds);
    if set_options.is_empty() && remove_options.is_empty() && lease_seconds.is_none() {
        return (DhcpDecision::Unchanged, None);
    }
    (
        DhcpDecision::Change(DhcpChanges {
            set_options,
            remove_options,
            lease_seconds,
        }),
        None,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::core::dhcp::OptionBytes;

    fn info(options: &[(u8, &[u8])], lease: Option<u32>) -> DhcpReplyInfo {
        DhcpReplyInfo {
            your_address: "192.168.30.10".parse().unwrap(),
            lease_seconds: lease,
            options: options
                .iter()
                .map(|(code, value)| OptionBytes {
                    code: *code,
                    value: value.to_vec(),
                })
                .collect(),
        }
    }

    fn shown() -> DhcpReplyInfo {
        info(
            &[(3, &[192, 168, 30, 1]), (6, &[192, 168, 30, 1]), (15, b"a")],
            Some(7200),
        )
    }

    fn reply(options: &[(u8, &[u8])], lease: Option<u32>) -> DhcpOutcome {
        DhcpOutcome::Reply(info(options, lease))
    }

    #[test]
    fn the_policies_reply_becomes_the_changes_that_make_it() {
        let same = reply(
            &[(3, &[192, 168, 30, 1]), (6, &[192, 168, 30, 1]), (15, b"a")],
            Some(7200),
        );
        assert_eq!(dhcp_decision(&shown(), same).0, DhcpDecision::Unchanged);
        let changed = reply(
            &[
                (3, &[192, 168, 30, 1]),
                (6, &[10, 0, 0, 53]),
                (121, &[0, 10, 0, 0, 1]),
            ],
            Some(600),
        );
        assert_eq!(
            dhcp_decision(&shown(), changed).0,
            DhcpDecision::Change(DhcpChanges {
                set_options: vec![(6, vec![10, 0, 0, 53]), (121, vec![0, 10, 0, 0, 1])],
                remove_options: vec![15],
                lease_seconds: Some(600),
            })
        );
        let zero = reply(
            &[(3, &[192, 168, 30, 1]), (6, &[192, 168, 30, 1]), (15, b"a")],
            Some(0),
        );
        assert_eq!(
            dhcp_decision(&shown(), zero).0,
            DhcpDecision::Unchanged,
            "lease 0 ignored"
        );
        let none = DhcpOutcome::NoReply { by: "p".into() };
        assert_eq!(
            dhcp_decision(&shown(), none),
            (DhcpDecision::NoReply, Some("p".into()))
        );
    }
}
