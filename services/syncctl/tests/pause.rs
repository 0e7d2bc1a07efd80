//! `syncctl status` shows a CRM pause notice, and says when one asks for longer than integrators
//! hold: whoever can write the control bucket may write any length, integrators cap it.

mod common;

use common::prepared;
use sync_topology::messages::{PAUSE_KEY, PauseNotice};

#[tokio::test]
async fn status_shows_a_pause_notice_and_flags_one_longer_than_integrators_hold()
-> anyhow::Result<()> {
    let (nats, pipeline) = prepared(None).await?;
    let control = pipeline
        .js
        .get_key_value(pipeline.names.control_bucket())
        .await?;
    let now = chrono::Utc::now().timestamp_millis();
    let config = syncctl::status::StatusConfig {
        nats,
        database_url: None,
    };
    for (asked_ms, flagged) in [(20_000, false), (24 * 3_600_000, true)] {
        let notice = PauseNotice {
            until_ms: now + asked_ms,
            set_by: "someone".to_owned(),
            reason: "HTTP 429 from the CRM".to_owned(),
            since_ms: now,
        };
        control
            .put(PAUSE_KEY, serde_json::to_vec(&notice)?.into())
            .await?;
        let status = syncctl::status::collect(&config).await?;
        assert_eq!(status.crm_pause.as_ref(), Some(&notice));
        let shown = status.to_string();
        assert!(shown.contains("CRM pause"), "{shown}");
        assert!(shown.contains("at most its --max-pause"), "{shown}");
        let warned = status.warnings.iter().any(|w| w.contains("pause notice"));
        assert_eq!(warned, flagged, "{:?}", status.warnings);
    }
    Ok(())
}
