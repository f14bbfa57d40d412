import t from 'tap';
import { resolve } from '../src/resolve.js';
t.test('defaults only', async (t) => {
  const e = resolve([]);
  t.equal(e['mailstore.format']?.value, 'maildir');
});
