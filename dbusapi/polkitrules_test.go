package dbusapi

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/volagent/volagent/internal/testutil"
)

// TestPolkitRules runs the shipped polkit rules file in a JavaScript
// engine (node) with polkit's rule API stubbed: it must parse, and grant
// ManageAction to members of DefaultAdminGroup and nothing else, as the
// README says and as UnixAuthorizer does without polkitd. The package
// must ship it where polkitd reads rules. (A test against a real polkitd
// runs in the package tests on Debian guests.)
func TestPolkitRules(t *testing.T) {
	testutil.RequireTool(t, "node")
	rules := filepath.Join("..", "packaging", "polkit", "50-volagent.rules")
	src, err := os.ReadFile(rules)
	if err != nil {
		t.Fatal(err)
	}
	// polkit's engine is ES5 (duktape): a plain script, each rule called
	// with (action, subject); subject.isInGroup answers from the user's
	// groups.
	harness := fmt.Sprintf(`
var rules = [];
var polkit = { Result: { YES: "yes", NO: "no", AUTH_ADMIN_KEEP: "auth_admin_keep", NOT_HANDLED: null },
               addRule: function (f) { rules.push(f); }, log: function () {} };
%s
function decide(actionID, groups) {
  var action = { id: actionID, lookup: function () { return undefined; } };
  var subject = { user: "alice", groups: groups, local: true, active: true,
                  isInGroup: function (g) { return groups.indexOf(g) >= 0; },
                  isInNetGroup: function () { return false; } };
  for (var i = 0; i < rules.length; i++) {
    var r = rules[i](action, subject);
    if (r !== null && r !== undefined) { return r; }
  }
  return "default";
}
var cases = [[%q, [%q, "users"]], [%q, ["users"]], ["org.example.other", [%q]]];
for (var i = 0; i < cases.length; i++) { console.log(decide(cases[i][0], cases[i][1])); }
`, src, ManageAction, DefaultAdminGroup, ManageAction, DefaultAdminGroup)
	script := filepath.Join(t.TempDir(), "rules.js")
	if err := os.WriteFile(script, []byte(harness), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("node", script).CombinedOutput()
	if err != nil {
		t.Fatalf("node %s: %v\n%s", rules, err, out)
	}
	want := "yes\ndefault\ndefault"
	if got := strings.TrimSpace(string(out)); got != want {
		t.Fatalf("decisions (member, non-member, other action) = %q, want %q", got, want)
	}

	nfpm, err := os.ReadFile(filepath.Join("..", "packaging", "nfpm.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(nfpm), "- src: ./packaging/polkit/50-volagent.rules\n    dst: /usr/share/polkit-1/rules.d/50-volagent.rules\n") {
		t.Fatal("packaging/nfpm.yaml does not ship packaging/polkit/50-volagent.rules as /usr/share/polkit-1/rules.d/50-volagent.rules")
	}
}
