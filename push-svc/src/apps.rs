//! Which provider pushes to a device: one set of credentials per app and
//! platform. The default app (`""`) comes from the seed's variables
//! (`FIREBASE_*`, `APNS_*`); more apps from `PUSH_APPS` (see
//! [`crate::config`]). A device's `app` picks its credentials.

use std::collections::HashMap;
use std::sync::Arc;

use quckchat_runtime::config::ConfigError;

use crate::config::{AppCredentials, APNS_PRIVATE_KEY, FIREBASE_SERVICE_ACCOUNT, PUSH_APPS};
use crate::devices::{Device, Platform};
use crate::providers::apns::{Apns, ApnsConfig};
use crate::providers::fcm::{Fcm, FcmConfig, ServiceAccount};
use crate::providers::Provider;

/// The providers of every configured app. An error names the variable
/// that holds the bad credentials (`FIREBASE_SERVICE_ACCOUNT`,
/// `APNS_PRIVATE_KEY`, or `PUSH_APPS` with the app) and what is wrong,
/// never the secret.
pub fn build(apps: &[AppCredentials]) -> Result<Apps, ConfigError> {
    let mut built = Apps::new();
    for app in apps {
        let (fcm_key, apns_key, named) = if app.app.is_empty() {
            (FIREBASE_SERVICE_ACCOUNT, APNS_PRIVATE_KEY, String::new())
        } else {
            (PUSH_APPS, PUSH_APPS, format!("app {:?}: ", app.app))
        };
        if let Some(f) = &app.fcm {
            let fcm = ServiceAccount::parse(&f.service_account)
                .and_then(|account| FcmConfig::new(account, f.project_id.clone()))
                .and_then(|mut config| {
                    config.api_url.clone_from(&f.api_url);
                    Fcm::new(config)
                })
                .map_err(|e| ConfigError::new(fcm_key, format!("{named}FCM: {e}")))?;
            built = built.with_fcm(&app.app, Arc::new(fcm));
        }
        if let Some(a) = &app.apns {
            let apns = ApnsConfig::new(&a.key_id, &a.team_id, &a.private_key, &a.topic)
                .and_then(|mut config| {
                    config.url.clone_from(&a.url);
                    Apns::new(config)
                })
                .map_err(|e| ConfigError::new(apns_key, format!("{named}APNS: {e}")))?;
            built = built.with_apns(&app.app, Arc::new(apns));
        }
    }
    Ok(built)
}

#[derive(Default)]
pub struct Apps {
    fcm: HashMap<String, Arc<dyn Provider>>,
    apns: HashMap<String, Arc<dyn Provider>>,
}

impl Apps {
    pub fn new() -> Self {
        Self::default()
    }

    /// FCM credentials of `app` (`""`: the default app).
    pub fn with_fcm(mut self, app: &str, provider: Arc<dyn Provider>) -> Self {
        self.fcm.insert(app.to_owned(), provider);
        self
    }

    /// APNS credentials of `app` (alerts and VoIP: one key and bundle id).
    pub fn with_apns(mut self, app: &str, provider: Arc<dyn Provider>) -> Self {
        self.apns.insert(app.to_owned(), provider);
        self
    }

    /// No credentials at all: push is off.
    pub fn is_empty(&self) -> bool {
        self.fcm.is_empty() && self.apns.is_empty()
    }

    /// `fcm:<app>`/`apns:<app>` of every configured app (start-up log).
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .fcm
            .keys()
            .map(|a| format!("fcm:{}", if a.is_empty() { "default" } else { a }))
            .chain(
                self.apns
                    .keys()
                    .map(|a| format!("apns:{}", if a.is_empty() { "default" } else { a })),
            )
            .collect();
        names.sort();
        names
    }

    pub fn provider(&self, device: &Device) -> Option<&Arc<dyn Provider>> {
        let app = device.app.as_deref().unwrap_or("");
        match device.platform {
            Platform::Fcm => self.fcm.get(app),
            Platform::Apns | Platform::ApnsVoip => self.apns.get(app),
        }
    }
}
