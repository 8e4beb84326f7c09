# edgebind_action: a recipe that installs one Edgebind device action.
#
# The recipe installs the action's program (anywhere under ${D}, usually
# ${libexecdir}/edgebind-actions/) and ships its definition, a TOML file in
# SRC_URI (see agent/src/actions/declared.rs for the format); this class
# installs the definition as ${sysconfdir}/edgebind/actions.d/NAME.toml, where
# the agent reads it, and fails the build when the definition would be
# skipped by the agent (unknown key, bad name, relative program path, bad
# argument types) or names a program this recipe does not install.
#
#   inherit edgebind_action
#   EDGEBIND_ACTION_NAME = "selftest"            # default: ${BPN} without "edgebind-action-"
#   EDGEBIND_ACTION_DEFINITION = "selftest.toml" # default: NAME.toml, from SRC_URI

EDGEBIND_ACTION_NAME ??= "${@d.getVar('BPN').replace('edgebind-action-', '', 1)}"
EDGEBIND_ACTION_DEFINITION ??= "${EDGEBIND_ACTION_NAME}.toml"
EDGEBIND_ACTIONS_DIR = "${sysconfdir}/edgebind/actions.d"

FILES:${PN} += "${EDGEBIND_ACTIONS_DIR}/${EDGEBIND_ACTION_NAME}.toml"
RDEPENDS:${PN} += "edgebind-agent"

do_install:append() {
    install -d ${D}${EDGEBIND_ACTIONS_DIR}
    install -m 0644 ${UNPACKDIR}/${EDGEBIND_ACTION_DEFINITION} ${D}${EDGEBIND_ACTIONS_DIR}/${EDGEBIND_ACTION_NAME}.toml
}

# The rules live in lib/edgebind/action_check.py (importable through
# layer.conf's addpylib) so that tests/layer/action-check runs the very same
# code on good and bad definitions without a build.
python edgebind_action_check() {
    from edgebind import action_check

    name = d.getVar('EDGEBIND_ACTION_NAME')
    dest = d.getVar('D')
    path = dest + d.getVar('EDGEBIND_ACTIONS_DIR') + '/' + name + '.toml'
    found = action_check.problems(name, path, dest)
    if found:
        bb.fatal('%s: action definition %s: %s' % (
            d.getVar('PN'), d.getVar('EDGEBIND_ACTION_DEFINITION'), '; '.join(found)))
}
edgebind_action_check[doc] = "Fail the build when the action definition would be skipped by the agent or names a program the recipe does not install"
do_install[postfuncs] += "edgebind_action_check"
