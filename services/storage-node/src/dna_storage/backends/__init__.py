"""Mailbox storage backends: one interface (`base.MailboxBackend`), two implementations
(SQLite, the embedded default; Redis, for operators), one contract test suite."""
