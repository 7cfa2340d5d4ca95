//! TODO(session)
