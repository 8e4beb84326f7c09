//! Agent library (filled in by the agent work).
