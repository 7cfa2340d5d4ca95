//! The HTTP gateway (issue 4). Nothing is implemented here yet.
