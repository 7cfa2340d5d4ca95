//! TODO(session): being written.
