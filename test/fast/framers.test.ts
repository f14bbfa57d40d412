// Fast tier: the IMAP and POP3 framers against golden transcripts (test/transcripts), fed whole,
// split at every byte and one byte at a time; they must frame the same commands every time.
import t from 'tap';
import { ImapFramer } from '../../src/proxy/imap-framer.js';
import { Pop3Framer } from '../../src/proxy/pop3-framer.js';
import { transcripts, deliveries, render } from './transcript.js';

function imapFrames(chunks: readonly Buffer[]): string[] {
  const f = new ImapFramer();
  const out: string[] = [];
  for (const c of chunks) {
    f.feed(c);
    for (let fr = f.next(); fr !== null; fr = f.next()) {
      out.push(fr.kind === 'error' ? render('error', undefined, fr.code) : render(fr.kind, fr.parts));
      if (fr.kind === 'continue') f.accept();
      if (fr.kind === 'error') return out;
    }
  }
  return out;
}

function pop3Frames(chunks: readonly Buffer[]): string[] {
  const f = new Pop3Framer();
  const out: string[] = [];
  for (const c of chunks) {
    f.feed(c);
    for (let fr = f.next(); fr !== null; fr = f.next()) {
      if (fr.kind === 'too-long') {
        out.push(render('error', undefined, 'line-too-long'));
        return out;
      }
      out.push(render('line', [fr.line]));
    }
  }
  return out;
}

for (const [prefix, frames] of [['imap-', imapFrames], ['pop3-', pop3Frames]] as const) {
  const all = transcripts(prefix);
  t.ok(all.length > 0, `transcripts ${prefix}*.txt exist`);
  for (const tr of all) {
    t.test(tr.name, async (t) => {
      let bad = 0;
      for (const d of deliveries(tr.input)) {
        const got = frames(d.chunks);
        if (JSON.stringify(got) !== JSON.stringify(tr.frames) && bad++ < 3) t.same(got, tr.frames, d.how);
      }
      t.equal(bad, 0, `the same frames every way of cutting ${tr.input.length} bytes`);
    });
  }
}
