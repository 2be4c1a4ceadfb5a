# .cu -> .cpp for the emulator: kernel launches become emu::launch calls,
# dynamic shared memory a pointer from the emulator.
import re, sys
src, dst = sys.argv[1], sys.argv[2]
s = open(src).read()
pat = re.compile(r'([A-Za-z_][\w:]*(?:<[^;]*?>)?)<<<(.*?)>>>\((.*?)\);', re.S)
def sub(m):
    args = m.group(3).strip()
    return 'emu::launch(%s, emu::Config(%s)%s);' % (m.group(1), m.group(2), (', ' + args) if args else '')
s, n = pat.subn(sub, s)
if '<<<' in s:
    sys.exit('%s: a kernel launch convert.py cannot rewrite: %s' % (src, s[s.index('<<<') - 60:s.index('<<<') + 60]))
s = s.replace('extern __shared__ double smem[];', 'double* smem = static_cast<double*>(::emu::dynamic_shared());')
open(dst, 'w').write('#include "emu_core.hpp"\n' + s)
print(src, 'launches rewritten:', n)
