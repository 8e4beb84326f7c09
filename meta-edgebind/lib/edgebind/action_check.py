"""Build-time check of an Edgebind action definition (edgebind_action.bbclass).

The agent skips a definition file it cannot use (agent/src/actions/declared.rs)
and the fleet then never sees the action: this check fails the image build for
the same reasons instead, and when the program the definition names is not
installed by the recipe.

    problems(name, definition_path, dest) -> list of messages (empty: usable)

`dest` is the recipe's ${D}: the program must exist there, executable. Also a
command for tests and hand use:

    python3 action_check.py NAME DEFINITION.toml DESTDIR
"""

import os
import re
import sys

try:
    import tomllib
except ImportError:  # Python < 3.11
    tomllib = None

# The agent's rules (protocol/src/actions.rs check_name, declared.rs parse).
NAME_RULE = re.compile(r'^[a-z][a-z0-9_-]{0,63}\Z')
TOP_KEYS = {'description', 'program', 'timeout_s', 'user', 'output_limit_bytes', 'idempotent',
            'writable_paths', 'positional', 'args'}
ARG_KEYS = {'type', 'allowed', 'max_len', 'min', 'max', 'required', 'description'}
TIMEOUT_RANGE = (1, 86400)
MAX_OUTPUT_LIMIT = 65536


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def problems(name, definition_path, dest):
    """Every reason the agent would skip this definition, or not find its program."""
    if tomllib is None:
        return ['checking needs Python 3.11 (tomllib) on the build host']
    out = []
    if not NAME_RULE.match(name):
        out.append('action name %r: lowercase letters, digits, "-" and "_", starting with a '
                   'letter, at most 64' % name)
    try:
        with open(definition_path, 'rb') as f:
            spec = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        return out + ['does not parse: %s' % e]

    unknown = sorted(set(spec) - TOP_KEYS)
    if unknown:
        out.append('unknown keys %s (the agent would skip the file)' % ', '.join(unknown))
    program = spec.get('program')
    if not isinstance(program, str) or not program.startswith('/'):
        out.append('program must be an absolute path, not %r' % (program,))
    else:
        installed = os.path.join(dest, program.lstrip('/'))
        if not os.path.isfile(installed) or not os.access(installed, os.X_OK):
            out.append('program %s is not installed (executable) by this recipe' % program)
    timeout = spec.get('timeout_s', 60)
    if not _is_int(timeout) or not TIMEOUT_RANGE[0] <= timeout <= TIMEOUT_RANGE[1]:
        out.append('timeout_s must be a whole number in %d..%d, not %r' % (TIMEOUT_RANGE + (timeout,)))
    limit = spec.get('output_limit_bytes', 16384)
    if not _is_int(limit) or not 0 <= limit <= MAX_OUTPUT_LIMIT:
        out.append('output_limit_bytes must be a whole number up to %d, not %r' % (MAX_OUTPUT_LIMIT, limit))
    if 'idempotent' in spec and not isinstance(spec['idempotent'], bool):
        out.append('idempotent must be true or false')
    user = spec.get('user')
    if user is not None and (not isinstance(user, str) or not user
                             or any(c in user for c in '/\0 =')):
        out.append('user %r is not a user name' % (user,))
    for p in spec.get('writable_paths', []):
        if not isinstance(p, str) or not p.startswith('/'):
            out.append('writable_paths entry %r is not absolute' % (p,))
    args = spec.get('args', {})
    if not isinstance(args, dict):
        return out + ['args must be a table of argument tables']
    for arg, a in args.items():
        if not NAME_RULE.match(arg):
            out.append('argument name %r is not allowed' % arg)
        if not isinstance(a, dict):
            out.append('args.%s must be a table' % arg)
            continue
        unknown = sorted(set(a) - ARG_KEYS)
        if unknown:
            out.append('args.%s: unknown keys %s' % (arg, ', '.join(unknown)))
        kind = a.get('type')
        if kind not in ('string', 'integer', 'bool'):
            out.append('args.%s: type must be string, integer or bool, not %r' % (arg, kind))
        if kind == 'integer' and not (_is_int(a.get('min')) and _is_int(a.get('max'))
                                      and a['min'] <= a['max']):
            out.append('args.%s: an integer needs min <= max' % arg)
        if kind != 'string' and ('allowed' in a or 'max_len' in a):
            out.append('args.%s: allowed and max_len are for strings' % arg)
        if kind != 'integer' and ('min' in a or 'max' in a):
            out.append('args.%s: min and max are for integers' % arg)
    for p in spec.get('positional', []):
        if p not in args:
            out.append('positional %r is not a declared argument' % (p,))
    return out


def main(argv):
    if len(argv) != 4:
        print('usage: action_check.py NAME DEFINITION.toml DESTDIR', file=sys.stderr)
        return 2
    found = problems(argv[1], argv[2], argv[3])
    for p in found:
        print('%s: %s' % (argv[2], p), file=sys.stderr)
    return 1 if found else 0


if __name__ == '__main__':
    sys.exit(main(sys.argv))
