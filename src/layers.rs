//! The Easemob stack's layers, over the core they use: each turns a concern of the domain (validation, the token,
//! the quota, the connection to Easemob) into a tower layer, and fails with a typed error that the rescue layer
//! answers. The core modules (`routes`, `token`, `ratelimit`, `upstream`) know nothing of them.

pub mod forward;
pub mod placeholder;
pub mod quota;
pub mod token;
pub mod validate;
