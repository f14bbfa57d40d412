// A mail client run inside a test network namespace (test/helpers/netns.ts): the test process
// cannot reach those networks itself. One exchange per run; prints the server's deciding answer
// as one line, or `error: …` when the connection failed; gives up after LIMIT_MS.
//   imap HOST PORT USER PASS         the tagged answer to LOGIN
//   pop3 HOST PORT USER PASS         the answer to PASS
//   lmtp HOST PORT RCPT SUBJECT      the RCPT answer when it is not 250, else the DATA answer
import { connect } from 'node:net';

const LIMIT_MS = 60_000;
const [kind, host, port, a, b] = process.argv.slice(2);

function session(script) {
  return new Promise((resolve) => {
    const s = connect(Number(port), host);
    let buf = '';
    let step = 0;
    const done = (line) => {
      clearTimeout(timer);
      s.destroy();
      resolve(line);
    };
    const timer = setTimeout(() => done(`error: no answer within ${LIMIT_MS} ms (${JSON.stringify(buf.slice(-200))})`), LIMIT_MS);
    s.setEncoding('utf8');
    s.on('error', (e) => done(`error: ${e.code ?? e.message}`));
    s.on('close', () => done(`error: closed (${JSON.stringify(buf.slice(-200))})`));
    s.on('data', (d) => {
      buf += d;
      let i;
      while ((i = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, i).replace(/\r$/, '');
        buf = buf.slice(i + 1);
        const r = script[step](line, (x) => s.write(x));
        if (r === true) step++;
        else if (typeof r === 'string') return done(r);
      }
    });
  });
}

let script;
if (kind === 'imap') {
  script = [
    (l, w) => (l.startsWith('* OK') ? (w(`a1 LOGIN "${a}" "${b}"\r\n`), true) : `greeting: ${l}`),
    (l, w) => (l.startsWith('a1 ') ? (w('a2 LOGOUT\r\n'), l) : undefined),
  ];
} else if (kind === 'pop3') {
  script = [
    (l, w) => (l.startsWith('+OK') ? (w(`USER ${a}\r\n`), true) : `greeting: ${l}`),
    (l, w) => (l.startsWith('+OK') ? (w(`PASS ${b}\r\n`), true) : l),
    (l, w) => (w('QUIT\r\n'), l),
  ];
} else if (kind === 'lmtp') {
  const msg = `From: bob@example.test\r\nTo: ${a}\r\nSubject: ${b}\r\nMessage-ID: <${b.replace(/\W/g, '')}.${process.pid}@test>\r\n\r\nhello\r\n.\r\n`;
  const ok = (re, next) => (l, w) => (/^\d{3}-/.test(l) ? undefined : re.test(l) ? (w(next), true) : l);
  script = [
    ok(/^220 /, 'LHLO client.test\r\n'),
    ok(/^250 /, 'MAIL FROM:<bob@example.test>\r\n'),
    ok(/^250 /, `RCPT TO:<${a}>\r\n`),
    ok(/^250 /, 'DATA\r\n'),
    ok(/^354 /, msg),
    (l, w) => (/^\d{3}-/.test(l) ? undefined : (w('QUIT\r\n'), l)),
  ];
} else {
  console.error(`unknown exchange ${kind}`);
  process.exit(64);
}
console.log(await session(script));
