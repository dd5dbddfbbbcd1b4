//! Cluster-key authentication, free of I/O.
//!
//! Both ends send a fixed-size hello (role, cluster id, fresh 32-byte nonce, options) and then a
//! proof: `HMAC-SHA256(key, "proof" || role || T)` where the transcript hash
//! `T = SHA-256(label || binding || client_hello || server_hello)`. `binding` ties the proof to
//! the underlying channel (the TLS exporter for QUIC). Because each side's nonce is fresh, a
//! recorded proof never verifies again (replay), and because the role is in the proof, a proof
//! cannot be reflected back. Session keys for the record layer are derived from the key and `T`
//! with HKDF, so every record after the handshake is bound to this handshake too.

use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

pub const HELLO_LEN: usize = 48;
pub const PROOF_LEN: usize = 32;
const HELLO_MAGIC: [u8; 4] = *b"BTNA";
const AUTH_VERSION: u8 = 1;
const LABEL: &[u8] = b"baton-link-auth-v1";
const FLAG_ENCRYPT: u8 = 1;

/// The shared secret every node of a cluster holds.
#[derive(Clone)]
pub struct ClusterKey([u8; 32]);

impl ClusterKey {
    /// Derives the key from the key file's bytes (any length of at least 16 bytes).
    pub fn from_bytes(material: &[u8]) -> Result<Self, AuthError> {
        if material.len() < 16 {
            return Err(AuthError::ShortKey(material.len()));
        }
        let (prk, _) = Hkdf::<Sha256>::extract(Some(b"baton-cluster-key"), material);
        Ok(ClusterKey(prk.into()))
    }

    /// Public identifier of the cluster (also advertised over mDNS); reveals nothing of the key.
    pub fn cluster_id(&self) -> [u8; 8] {
        let d = Sha256::new().chain_update(b"baton-cluster-id").chain_update(self.0).finalize();
        d[..8].try_into().expect("8 of 32 bytes")
    }
}

impl std::fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClusterKey(id={:02x?})", self.cluster_id())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The end that dialed.
    Client,
    /// The end that accepted.
    Server,
}

impl Role {
    fn code(self) -> u8 {
        match self {
            Role::Client => 1,
            Role::Server => 2,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("cluster key material is {0} bytes, at least 16 needed")]
    ShortKey(usize),
    #[error("peer did not speak the baton link handshake (magic {0:02x?})")]
    BadMagic([u8; 4]),
    #[error("peer handshake version {0} is not supported")]
    BadVersion(u8),
    #[error("peer claims the same role as this end")]
    BadRole,
    #[error("peer belongs to cluster {}, this node to {}: they hold different cluster keys", hex(peer), hex(ours))]
    WrongCluster { ours: [u8; 8], peer: [u8; 8] },
    #[error("peer's proof of the cluster key is wrong (wrong key, replayed or tampered handshake)")]
    BadProof,
}

/// A cluster id as the logs and `baton status` write it.
fn hex(id: &[u8]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// Keys for the record layer, one per direction.
#[derive(Clone)]
pub struct SessionKeys {
    pub send_mac: [u8; 32],
    pub recv_mac: [u8; 32],
    pub send_aead: [u8; 32],
    pub recv_aead: [u8; 32],
    /// True when either end asked for encryption.
    pub encrypt: bool,
}

pub struct Handshake {
    role: Role,
    key: ClusterKey,
    binding: Vec<u8>,
    hello: [u8; HELLO_LEN],
    transcript: Option<[u8; 32]>,
    encrypt: bool,
}

impl Handshake {
    pub fn new(role: Role, key: ClusterKey, binding: &[u8], want_encrypt: bool) -> Self {
        let nonce: [u8; 32] = rand::random();
        Self::with_nonce(role, key, binding, want_encrypt, nonce)
    }

    /// Deterministic constructor for tests.
    pub fn with_nonce(role: Role, key: ClusterKey, binding: &[u8], want_encrypt: bool, nonce: [u8; 32]) -> Self {
        let mut hello = [0u8; HELLO_LEN];
        hello[0..4].copy_from_slice(&HELLO_MAGIC);
        hello[4] = AUTH_VERSION;
        hello[5] = role.code();
        hello[6] = if want_encrypt { FLAG_ENCRYPT } else { 0 };
        hello[8..16].copy_from_slice(&key.cluster_id());
        hello[16..48].copy_from_slice(&nonce);
        Handshake { role, key, binding: binding.to_vec(), hello, transcript: None, encrypt: want_encrypt }
    }

    pub fn hello(&self) -> [u8; HELLO_LEN] {
        self.hello
    }

    /// Checks the peer's hello and returns this end's proof.
    pub fn receive_hello(&mut self, peer: &[u8; HELLO_LEN]) -> Result<[u8; PROOF_LEN], AuthError> {
        let magic: [u8; 4] = peer[0..4].try_into().expect("4 bytes");
        if magic != HELLO_MAGIC {
            return Err(AuthError::BadMagic(magic));
        }
        if peer[4] != AUTH_VERSION {
            return Err(AuthError::BadVersion(peer[4]));
        }
        let expected_role = match self.role {
            Role::Client => Role::Server,
            Role::Server => Role::Client,
        };
        if peer[5] != expected_role.code() {
            return Err(AuthError::BadRole);
        }
        let peer_id: [u8; 8] = peer[8..16].try_into().expect("8 bytes");
        let ours = self.key.cluster_id();
        if peer_id != ours {
            return Err(AuthError::WrongCluster { ours, peer: peer_id });
        }
        self.encrypt |= peer[6] & FLAG_ENCRYPT != 0;
        let (client, server) = match self.role {
            Role::Client => (&self.hello, peer),
            Role::Server => (peer, &self.hello),
        };
        let t: [u8; 32] = Sha256::new()
            .chain_update(LABEL)
            .chain_update((self.binding.len() as u64).to_le_bytes())
            .chain_update(&self.binding)
            .chain_update(client)
            .chain_update(server)
            .finalize()
            .into();
        self.transcript = Some(t);
        Ok(self.proof_for(self.role, &t).finalize().into_bytes().into())
    }

    fn proof_for(&self, role: Role, t: &[u8; 32]) -> Hmac<Sha256> {
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&self.key.0).expect("HMAC takes any key length");
        m.update(b"proof");
        m.update(&[role.code()]);
        m.update(t);
        m
    }

    /// Verifies the peer's proof (constant time) and derives the session keys.
    pub fn receive_proof(self, proof: &[u8; PROOF_LEN]) -> Result<SessionKeys, AuthError> {
        let t = self.transcript.ok_or(AuthError::BadProof)?;
        let peer_role = match self.role {
            Role::Client => Role::Server,
            Role::Server => Role::Client,
        };
        self.proof_for(peer_role, &t).verify_slice(proof).map_err(|_| AuthError::BadProof)?;
        let hk = Hkdf::<Sha256>::new(Some(&t), &self.key.0);
        let derive = |label: &[u8]| {
            let mut k = [0u8; 32];
            hk.expand(label, &mut k).expect("32 bytes is a valid HKDF-SHA256 length");
            k
        };
        let (c2s_mac, s2c_mac) = (derive(b"c2s mac"), derive(b"s2c mac"));
        let (c2s_aead, s2c_aead) = (derive(b"c2s aead"), derive(b"s2c aead"));
        Ok(match self.role {
            Role::Client => SessionKeys {
                send_mac: c2s_mac,
                recv_mac: s2c_mac,
                send_aead: c2s_aead,
                recv_aead: s2c_aead,
                encrypt: self.encrypt,
            },
            Role::Server => SessionKeys {
                send_mac: s2c_mac,
                recv_mac: c2s_mac,
                send_aead: s2c_aead,
                recv_aead: c2s_aead,
                encrypt: self.encrypt,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> ClusterKey {
        ClusterKey::from_bytes(&[b; 32]).unwrap()
    }

    fn run(c: &mut Handshake, s: &mut Handshake) -> (Result<[u8; 32], AuthError>, Result<[u8; 32], AuthError>) {
        let ch = c.hello();
        let sh = s.hello();
        (c.receive_hello(&sh), s.receive_hello(&ch))
    }

    #[test]
    fn same_key_agrees_on_keys() {
        let mut c = Handshake::new(Role::Client, key(1), b"b", false);
        let mut s = Handshake::new(Role::Server, key(1), b"b", true);
        let (cp, sp) = run(&mut c, &mut s);
        let ck = c.receive_proof(&sp.unwrap()).unwrap();
        let sk = s.receive_proof(&cp.unwrap()).unwrap();
        assert_eq!(ck.send_mac, sk.recv_mac);
        assert_eq!(ck.recv_aead, sk.send_aead);
        assert!(ck.encrypt && sk.encrypt);
    }

    #[test]
    fn wrong_cluster_is_refused_by_id() {
        let mut c = Handshake::new(Role::Client, key(1), b"", false);
        let mut s = Handshake::new(Role::Server, key(2), b"", false);
        let (cp, _) = run(&mut c, &mut s);
        assert!(matches!(cp, Err(AuthError::WrongCluster { .. })));
    }

    #[test]
    fn forged_cluster_id_fails_the_proof() {
        // An attacker copies the public cluster id but lacks the key, so its proof is a guess.
        let mut c = Handshake::new(Role::Client, key(1), b"", false);
        let mut forged = Handshake::new(Role::Server, key(2), b"", false).hello();
        forged[8..16].copy_from_slice(&key(1).cluster_id());
        c.receive_hello(&forged).unwrap();
        assert_eq!(c.receive_proof(&[7u8; 32]).err(), Some(AuthError::BadProof));
    }

    #[test]
    fn replayed_client_messages_fail() {
        let mut c = Handshake::new(Role::Client, key(1), b"", false);
        let mut s1 = Handshake::new(Role::Server, key(1), b"", false);
        let (cp, _) = run(&mut c, &mut s1);
        let recorded_hello = c.hello();
        let recorded_proof = cp.unwrap();
        let mut s2 = Handshake::new(Role::Server, key(1), b"", false);
        s2.receive_hello(&recorded_hello).unwrap();
        assert_eq!(s2.receive_proof(&recorded_proof).err(), Some(AuthError::BadProof));
    }

    #[test]
    fn reflected_proof_fails() {
        let mut c = Handshake::new(Role::Client, key(1), b"", false);
        let mut s = Handshake::new(Role::Server, key(1), b"", false);
        let (cp, _) = run(&mut c, &mut s);
        assert_eq!(c.receive_proof(&cp.unwrap()).err(), Some(AuthError::BadProof));
    }

    #[test]
    fn different_binding_fails() {
        let mut c = Handshake::new(Role::Client, key(1), b"tls-a", false);
        let mut s = Handshake::new(Role::Server, key(1), b"tls-b", false);
        let (cp, sp) = run(&mut c, &mut s);
        assert_eq!(c.receive_proof(&sp.unwrap()).err(), Some(AuthError::BadProof));
        assert_eq!(s.receive_proof(&cp.unwrap()).err(), Some(AuthError::BadProof));
    }
}
