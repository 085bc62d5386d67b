//! Cloud-to-device queues and delivery feedback, as plain data.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

/// Most messages waiting for one device (Azure: 50).
pub const MAX_QUEUE_DEPTH: usize = 50;
/// Default time to live (Azure: 1 hour).
pub const DEFAULT_TTL_MS: u64 = 60 * 60 * 1000;
/// Longest time to live (Azure: 2 days).
pub const MAX_TTL_MS: u64 = 2 * 24 * 60 * 60 * 1000;
/// Deliveries before a message is dead-lettered (Azure: 10).
pub const MAX_DELIVERY_COUNT: u32 = 10;
/// Largest C2D body (Azure: 64 KB).
pub const MAX_C2D_BYTES: usize = 64 * 1024;

/// Which outcomes the sender wants feedback for (`iothub-ack`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AckMode {
    /// No feedback.
    #[default]
    None,
    /// Feedback when the device completes the message.
    Positive,
    /// Feedback when the message expires, is rejected or dead-lettered.
    Negative,
    /// Both.
    Full,
}

impl AckMode {
    /// Parses `iothub-ack`.
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "none" => Some(Self::None),
            "positive" => Some(Self::Positive),
            "negative" => Some(Self::Negative),
            "full" => Some(Self::Full),
            _ => None,
        }
    }

    fn wants(self, outcome: FeedbackStatus) -> bool {
        match self {
            AckMode::None => false,
            AckMode::Full => true,
            AckMode::Positive => outcome == FeedbackStatus::Success,
            AckMode::Negative => outcome != FeedbackStatus::Success,
        }
    }
}

/// A message waiting for a device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct C2dMessage {
    /// Sender's message id.
    pub message_id: String,
    /// Lock token: the hub's sequence number for this message.
    pub lock_token: String,
    /// Correlation id.
    pub correlation_id: Option<String>,
    /// User id.
    pub user_id: Option<String>,
    /// Content type.
    pub content_type: Option<String>,
    /// Content encoding.
    pub content_encoding: Option<String>,
    /// Feedback wanted.
    pub ack: AckMode,
    /// Application properties.
    pub properties: BTreeMap<String, String>,
    /// Body.
    pub body: Vec<u8>,
    /// When it was enqueued (Unix ms).
    pub enqueued_ms: u64,
    /// When it expires (Unix ms).
    pub expiry_ms: u64,
    /// Delivery attempts so far.
    pub delivery_count: u32,
}

/// Outcome reported in a feedback record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FeedbackStatus {
    /// The device completed the message.
    Success,
    /// It expired before delivery.
    Expired,
    /// It reached the maximum delivery count.
    DeliveryCountExceeded,
    /// The device rejected it.
    Rejected,
    /// The queue was purged.
    Purged,
}

/// One feedback record, in Azure's feedback format.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FeedbackRecord {
    /// The C2D message's id.
    pub original_message_id: String,
    /// Human-readable outcome.
    pub description: String,
    /// Outcome.
    pub status_code: FeedbackStatus,
    /// Device id.
    pub device_id: String,
    /// The device's generation id.
    pub device_generation_id: String,
    /// When the outcome happened (ISO-8601).
    pub enqueued_time_utc: String,
}

/// A device's queue.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct C2dQueue {
    /// Messages in order.
    pub messages: VecDeque<C2dMessage>,
}

fn description(status: FeedbackStatus) -> &'static str {
    match status {
        FeedbackStatus::Success => "Success",
        FeedbackStatus::Expired => "Message expired",
        FeedbackStatus::DeliveryCountExceeded => "Delivery count exceeded",
        FeedbackStatus::Rejected => "Message rejected",
        FeedbackStatus::Purged => "Message purged",
    }
}

/// Builds the feedback record for `message` if its ack mode asks for `status`.
pub fn feedback_for(
    message: &C2dMessage,
    status: FeedbackStatus,
    device_id: &str,
    generation_id: &str,
    now_iso: &str,
) -> Option<FeedbackRecord> {
    message.ack.wants(status).then(|| FeedbackRecord {
        original_message_id: message.message_id.clone(),
        description: description(status).to_string(),
        status_code: status,
        device_id: device_id.to_string(),
        device_generation_id: generation_id.to_string(),
        enqueued_time_utc: now_iso.to_string(),
    })
}

/// A service's request to send a C2D message, as either front-end (REST headers, an AMQP message)
/// decoded it; [`C2dSendRequest::into_message`] applies Azure's limits once for both.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct C2dSendRequest {
    /// `message-id`; a random one when absent.
    pub message_id: Option<String>,
    /// `correlation-id`.
    pub correlation_id: Option<String>,
    /// `user-id`.
    pub user_id: Option<String>,
    /// `content-type`.
    pub content_type: Option<String>,
    /// `content-encoding`.
    pub content_encoding: Option<String>,
    /// `iothub-ack` as sent.
    pub ack: Option<String>,
    /// Absolute expiry (Unix ms); default one hour from now.
    pub expiry_ms: Option<u64>,
    /// Application properties.
    pub properties: BTreeMap<String, String>,
    /// Body.
    pub body: Vec<u8>,
}

impl C2dSendRequest {
    /// The message to enqueue, or the error the sender gets: body over 64 KB, an expiry in the
    /// past or beyond two days, an unknown `iothub-ack`.
    pub fn into_message(
        self,
        now_ms: u64,
        new_id: impl FnOnce() -> String,
    ) -> crate::domain::HubResult<C2dMessage> {
        use crate::domain::HubError;
        if self.body.len() > MAX_C2D_BYTES {
            return Err(HubError::new(
                meridian_proto::ErrorCode::MessageTooLarge,
                format!(
                    "C2D body is {} bytes; the limit is {MAX_C2D_BYTES}",
                    self.body.len()
                ),
            ));
        }
        let expiry_ms = self.expiry_ms.unwrap_or(now_ms + DEFAULT_TTL_MS);
        if expiry_ms <= now_ms || expiry_ms > now_ms + MAX_TTL_MS {
            return Err(HubError::invalid(
                "the message must expire in the future and within 2 days",
            ));
        }
        let ack = match self.ack.as_deref() {
            Some(a) => AckMode::parse(a).ok_or_else(|| {
                HubError::invalid("iothub-ack must be none, positive, negative or full")
            })?,
            None => AckMode::None,
        };
        Ok(C2dMessage {
            message_id: self.message_id.unwrap_or_else(new_id),
            lock_token: String::new(),
            correlation_id: self.correlation_id,
            user_id: self.user_id,
            content_type: self.content_type,
            content_encoding: self.content_encoding,
            ack,
            properties: self.properties,
            body: self.body,
            enqueued_ms: now_ms,
            expiry_ms,
            delivery_count: 0,
        })
    }
}

impl C2dQueue {
    /// Removes expired messages and returns them.
    pub fn take_expired(&mut self, now_ms: u64) -> Vec<C2dMessage> {
        let (expired, kept): (Vec<_>, Vec<_>) =
            self.messages.drain(..).partition(|m| m.expiry_ms <= now_ms);
        self.messages = kept.into();
        expired
    }

    /// Removes the message with `lock_token`.
    pub fn take(&mut self, lock_token: &str) -> Option<C2dMessage> {
        let idx = self
            .messages
            .iter()
            .position(|m| m.lock_token == lock_token)?;
        self.messages.remove(idx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(ack: AckMode, expiry_ms: u64) -> C2dMessage {
        C2dMessage {
            message_id: "m".into(),
            lock_token: "1".into(),
            correlation_id: None,
            user_id: None,
            content_type: None,
            content_encoding: None,
            ack,
            properties: BTreeMap::new(),
            body: Vec::new(),
            enqueued_ms: 0,
            expiry_ms,
            delivery_count: 0,
        }
    }

    #[test]
    fn ack_modes_select_feedback() {
        let m = message(AckMode::Positive, 10);
        assert!(feedback_for(&m, FeedbackStatus::Success, "d", "g", "t").is_some());
        assert!(feedback_for(&m, FeedbackStatus::Expired, "d", "g", "t").is_none());
        let m = message(AckMode::Negative, 10);
        assert!(feedback_for(&m, FeedbackStatus::Success, "d", "g", "t").is_none());
        assert!(feedback_for(&m, FeedbackStatus::Purged, "d", "g", "t").is_some());
        let m = message(AckMode::None, 10);
        assert!(feedback_for(&m, FeedbackStatus::Expired, "d", "g", "t").is_none());
        assert_eq!(AckMode::parse("FULL"), Some(AckMode::Full));
        assert_eq!(AckMode::parse("maybe"), None);
    }

    #[test]
    fn send_requests_get_azure_limits() {
        let ok = C2dSendRequest {
            ack: Some("full".into()),
            body: vec![1; 10],
            ..Default::default()
        }
        .into_message(1_000, || "generated".into())
        .expect("valid");
        assert_eq!(ok.message_id, "generated");
        assert_eq!(ok.ack, AckMode::Full);
        assert_eq!(ok.expiry_ms, 1_000 + DEFAULT_TTL_MS);
        let too_big = C2dSendRequest {
            body: vec![0; MAX_C2D_BYTES + 1],
            ..Default::default()
        };
        assert_eq!(
            too_big.into_message(0, String::new).map_err(|e| e.code),
            Err(meridian_proto::ErrorCode::MessageTooLarge)
        );
        for expiry in [500, 1_000 + MAX_TTL_MS + 1] {
            let r = C2dSendRequest {
                expiry_ms: Some(expiry),
                ..Default::default()
            };
            assert!(r.into_message(1_000, String::new).is_err());
        }
        let bad_ack = C2dSendRequest {
            ack: Some("sometimes".into()),
            ..Default::default()
        };
        assert!(bad_ack.into_message(0, String::new).is_err());
    }

    #[test]
    fn expiry_and_take() {
        let mut q = C2dQueue::default();
        q.messages.push_back(message(AckMode::None, 5));
        let mut later = message(AckMode::None, 50);
        later.lock_token = "2".into();
        q.messages.push_back(later);
        assert_eq!(q.take_expired(10).len(), 1);
        assert_eq!(q.messages.len(), 1);
        assert!(q.take("2").is_some());
        assert!(q.take("2").is_none());
    }
}
