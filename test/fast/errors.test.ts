// Fast tier: one error type. An AppError's code gives the exit status, the IMAP/POP3 response
// code and the mail status an MTA gets; a delivery step's refusal carries its own status.
import t from 'tap';
import { AppError, EX, mailError, mailStatusOf, replyCode } from '../../src/errors.js';
import { smtpCodeOf } from '../../src/delivery/outcome.js';

t.test('a mail outcome as an error keeps its status and its class', async (t) => {
  const over = mailError({ dsn: '5.2.2', text: 'Mailbox full' });
  t.equal(over.exit, EX.DATAERR);
  t.same(mailStatusOf(over, 'commit'), { dsn: '5.2.2', text: 'Mailbox full' }, 'what the MTA is told');
  t.equal(smtpCodeOf(mailStatusOf(over, 'commit')), 552, 'and the LMTP reply code');
  const later = mailError({ dsn: '4.2.0', text: 'locked' });
  t.equal(later.exit, EX.TEMPFAIL, 'a 4.x.x status is temporary: exit 75');
  t.ok(later.temporary);
});

t.test('the code decides the status, the exit and the client reply', async (t) => {
  t.same(mailStatusOf(new AppError('NO_SUCH_USER', 'no alice'), 'resolve'), { dsn: '5.1.1', text: 'resolve: no alice' });
  t.same(mailStatusOf(new AppError('DB_LOCKED', 'busy'), 'resolve'), { dsn: '4.3.0', text: 'resolve: busy' });
  t.same(mailStatusOf(new AppError('CONFIG_INVALID', 'bad'), 'start'), { dsn: '4.3.5', text: 'start: bad' });
  t.same(mailStatusOf(new Error('boom'), 'store'), { dsn: '4.3.0', text: 'store: internal error' }, 'a bug is temporary and its text stays in the log');
  t.equal(replyCode(new AppError('AUTH_FAILED', 'x'), 'imap'), 'AUTHENTICATIONFAILED');
  t.equal(replyCode(new AppError('AUTH_FAILED', 'x'), 'pop3'), 'AUTH');
  t.equal(replyCode(new AppError('CONFIG_INVALID', 'x'), 'imap'), 'UNAVAILABLE');
  t.equal(replyCode(new Error('x'), 'pop3'), 'SYS/TEMP');
  t.equal(new AppError('BACKEND_TIMEOUT', 'x').exit, EX.TEMPFAIL);
});
