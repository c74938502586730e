//! Who may call the data plane: source networks (`server.allow_from`) and, optionally, per-caller keys
//! (`[[callers]]`, stored as SHA-256 digests) whose name goes into the audit trail.

use std::net::IpAddr;

use ipnet::IpNet;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::Config;

#[derive(Debug, PartialEq, Eq)]
pub enum Denied {
    /// The source address is outside `server.allow_from`.
    Network,
    /// Keys are configured and the request presented none, or an unknown one.
    Key,
}

pub struct Access {
    allow_from: Vec<IpNet>,
    callers: Vec<(String, [u8; 32])>,
}

impl Access {
    pub fn new(config: &Config) -> Access {
        let callers = config
            .callers
            .iter()
            .filter_map(|c| {
                let digest: [u8; 32] = hex::decode(&c.key_sha256).ok()?.try_into().ok()?;
                Some((c.name.clone(), digest))
            })
            .collect();
        Access { allow_from: config.server.allow_from.clone(), callers }
    }

    /// Admits or denies a request; when keys are configured, returns the caller's configured name.
    pub fn check(&self, peer: IpAddr, key: Option<&[u8]>) -> Result<Option<&str>, Denied> {
        if !self.allow_from.is_empty() {
            // IPv4 callers on a dual-stack socket arrive as ::ffff:a.b.c.d.
            let peer = peer.to_canonical();
            if !self.allow_from.iter().any(|net| net.contains(&peer)) {
                return Err(Denied::Network);
            }
        }
        if self.callers.is_empty() {
            return Ok(None);
        }
        let digest: [u8; 32] = Sha256::digest(key.ok_or(Denied::Key)?).into();
        // Constant time, and every entry compared: timing says nothing about which digest came close.
        let mut found = None;
        for (name, expected) in &self.callers {
            if bool::from(expected.ct_eq(&digest)) {
                found = Some(name.as_str());
            }
        }
        found.map(Some).ok_or(Denied::Key)
    }
}

/// The hex SHA-256 of a key, as `[[callers]] key_sha256` wants it.
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.trim().as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access(allow: &[&str], keys: &[(&str, &str)]) -> Access {
        Access {
            allow_from: allow.iter().map(|n| n.parse().unwrap()).collect(),
            callers: keys
                .iter()
                .map(|(name, key)| (name.to_string(), hex::decode(hash_key(key)).unwrap().try_into().unwrap()))
                .collect(),
        }
    }

    #[test]
    fn networks_are_checked_when_configured() {
        let a = access(&["10.0.0.0/8"], &[]);
        assert_eq!(a.check("10.1.2.3".parse().unwrap(), None), Ok(None));
        assert_eq!(a.check("::ffff:10.1.2.3".parse().unwrap(), None), Ok(None));
        assert_eq!(a.check("127.0.0.1".parse().unwrap(), None), Err(Denied::Network));
        assert_eq!(a.check("::1".parse().unwrap(), None), Err(Denied::Network));
        assert_eq!(access(&[], &[]).check("192.0.2.1".parse().unwrap(), None), Ok(None));
    }

    #[test]
    fn keys_identify_callers() {
        let a = access(&[], &[("billing", "k-billing"), ("orders", "k-orders")]);
        let local = "127.0.0.1".parse().unwrap();
        assert_eq!(a.check(local, Some(b"k-orders")), Ok(Some("orders")));
        assert_eq!(a.check(local, Some(b"k-other")), Err(Denied::Key));
        assert_eq!(a.check(local, None), Err(Denied::Key));
    }
}
